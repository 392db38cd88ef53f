"""Interoperability tests with paho-mqtt 2.x clients (MQTT 3.1 and 3.1.1).

The broker is the coremq binary from $COREMQ_BIN (default target/release/coremq, relative
to the repository root), started with --backend $COREMQ_BACKEND (default auto) and
--threads 2. With COREMQ_TEST_BROKER=mosquitto the same tests run against mosquitto.
"""

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT = 5.0

PROTOCOLS = {"v31": mqtt.MQTTv31, "v311": mqtt.MQTTv311}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A broker process on a free loopback port, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, extra_args=()):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="coremq-pytest-")
        self.out = open(os.path.join(self.dir, "stdout"), "w+")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        if os.environ.get("COREMQ_TEST_BROKER") == "mosquitto":
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest stderr\nlog_type error\n")
            cmd = ["mosquitto", "-c", conf]
        else:
            binary = Path(os.environ.get("COREMQ_BIN", "target/release/coremq"))
            if not binary.is_absolute():
                binary = REPO / binary
            if not binary.exists():
                pytest.fail(f"coremq binary not found at {binary} (build it or set COREMQ_BIN)")
            cmd = [str(binary), "--listen", f"127.0.0.1:{self.port}", "--threads", "2",
                   "--backend", os.environ.get("COREMQ_BACKEND", "auto"), *extra_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=self.err)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"broker exited early ({self.proc.returncode}): {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"broker not ready on port {self.port} after 10 s")
                time.sleep(0.02)

    def output(self):
        self.out.seek(0)
        self.err.seek(0)
        return f"--- stdout ---\n{self.out.read()}\n--- stderr ---\n{self.err.read()}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def broker():
    b = Broker()
    yield b
    code = b.stop()
    # pytest shows captured output only for failing tests.
    print(b.output())
    b.out.close()
    b.err.close()
    shutil.rmtree(b.dir, ignore_errors=True)
    assert code == 0, f"broker did not shut down cleanly ({code}): {b.output()}"


class Client:
    """A connected paho client running its network loop in a thread."""

    def __init__(self, port, protocol, client_id=None, will=None, credentials=None):
        self.messages = queue.Queue()
        self.events = queue.Queue()
        cid = client_id or f"py-{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol)
        if will:
            self.c.will_set(*will)
        if credentials:
            self.c.username_pw_set(*credentials)
        self.c.on_connect = lambda c, u, flags, rc, props: self.events.put(("connack", rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("suback", rcs))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        kind, rc = self.events.get(timeout=WAIT)
        assert kind == "connack" and not rc.is_failure, (kind, rc)

    def subscribe(self, topic, qos):
        self.c.subscribe(topic, qos)
        kind, rcs = self.events.get(timeout=WAIT)
        assert kind == "suback" and [int(r.value) for r in rcs] == [qos], (kind, rcs)

    def publish(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def recv(self):
        return self.messages.get(timeout=WAIT)

    def expect_nothing(self, window=0.3):
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=window)
            pytest.fail(f"unexpected message {msg.topic} {msg.payload!r}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.parametrize("proto", list(PROTOCOLS))
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe(broker, proto, qos):
    sub = Client(broker.port, PROTOCOLS[proto])
    pub = Client(broker.port, PROTOCOLS[proto])
    topic = f"paho/{proto}/{qos}"
    sub.subscribe(topic, qos)
    for i in range(20):
        pub.publish(topic, f"m{i}".encode(), qos)
    for i in range(20):
        msg = sub.recv()
        assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, f"m{i}".encode(), qos, False)
    sub.expect_nothing()
    sub.close()
    pub.close()


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_mixed_protocol_versions_interoperate(broker, proto):
    other = mqtt.MQTTv311 if proto == "v31" else mqtt.MQTTv31
    sub = Client(broker.port, other)
    sub.subscribe("mix/#", 2)
    pub = Client(broker.port, PROTOCOLS[proto])
    pub.publish("mix/a", b"x", 1)
    msg = sub.recv()
    assert (msg.topic, msg.payload, msg.qos) == ("mix/a", b"x", 1)
    sub.close()
    pub.close()


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_retained(broker, proto):
    pub = Client(broker.port, PROTOCOLS[proto])
    pub.publish("ret/py", b"kept", 1, retain=True)
    for i in range(3):
        sub = Client(broker.port, PROTOCOLS[proto], client_id=f"ret-py-{proto}-{i}")
        sub.subscribe("ret/#", 2)
        msg = sub.recv()
        assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("ret/py", b"kept", 1, True)
        sub.expect_nothing()
        sub.close()
    # An empty retained payload clears it.
    pub.publish("ret/py", b"", 1, retain=True)
    sub = Client(broker.port, PROTOCOLS[proto])
    sub.subscribe("ret/#", 1)
    sub.expect_nothing()
    sub.close()
    pub.close()


WILL_CLIENT = textwrap.dedent("""
    import sys, time
    import paho.mqtt.client as mqtt
    port, proto = int(sys.argv[1]), int(sys.argv[2])
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-will", protocol=proto)
    c.will_set("will/py", b"gone", qos=1, retain=False)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not c.is_connected():
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(30)
""")


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_will_on_abnormal_exit(broker, proto):
    watch = Client(broker.port, PROTOCOLS[proto])
    watch.subscribe("will/#", 2)
    child = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, str(broker.port),
                              str(PROTOCOLS[proto])], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()  # SIGKILL: no DISCONNECT is ever sent
        child.wait(WAIT)
    msg = watch.recv()
    assert (msg.topic, msg.payload, msg.qos) == ("will/py", b"gone", 1)
    watch.close()


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_no_will_after_disconnect(broker, proto):
    watch = Client(broker.port, PROTOCOLS[proto])
    watch.subscribe("nowill/#", 1)
    c = Client(broker.port, PROTOCOLS[proto], will=("nowill/py", b"no", 1, False))
    c.close()
    watch.expect_nothing()
    watch.close()


def coremq_binary():
    binary = Path(os.environ.get("COREMQ_BIN", "target/release/coremq"))
    return binary if binary.is_absolute() else REPO / binary


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_password_and_acl(proto):
    """paho with username_pw_set against --password-file / --acl-file (files made by coremq passwd)."""
    if os.environ.get("COREMQ_TEST_BROKER") == "mosquitto":
        pytest.skip("uses coremq's own flags and passwd tool")
    d = tempfile.mkdtemp(prefix="coremq-pytest-auth-")
    pw, acl = os.path.join(d, "passwd"), os.path.join(d, "acl")
    for args in (["-c", "-b", pw, "alice", "alice-pw"], ["-b", pw, "bob", "bob-pw"]):
        subprocess.run([str(coremq_binary()), "passwd", *args], check=True, timeout=30)
    with open(acl, "w") as f:
        f.write("user alice\ntopic read py/#\nuser bob\ntopic write py/#\n")
    b = Broker(["--password-file", pw, "--acl-file", acl])
    try:
        alice = Client(b.port, PROTOCOLS[proto], credentials=("alice", "alice-pw"))
        alice.subscribe("py/#", 1)
        alice.c.subscribe("other/#", 1)
        kind, rcs = alice.events.get(timeout=WAIT)
        assert kind == "suback" and [int(r.value) for r in rcs] == [0x80], (kind, rcs)
        bob = Client(b.port, PROTOCOLS[proto], credentials=("bob", "bob-pw"))
        bob.publish("py/t", b"hello", 1)
        msg = alice.recv()
        assert (msg.topic, msg.payload) == ("py/t", b"hello")
        # alice may not write: acknowledged (3.1.1) but not delivered.
        alice.publish("py/t", b"denied", 1)
        alice.expect_nothing()
        # A wrong password is refused with CONNACK 5 (not authorized).
        bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-bad", protocol=PROTOCOLS[proto])
        bad.username_pw_set("alice", "nope")
        got = queue.Queue()
        bad.on_connect = lambda c, u, flags, rc, props: got.put(rc)
        bad.connect("127.0.0.1", b.port, keepalive=30)
        bad.loop_start()
        rc = got.get(timeout=WAIT)
        bad.loop_stop()
        assert rc.is_failure and int(rc.value) in (5, 0x87), rc
        alice.close()
        bob.close()
    finally:
        assert b.stop() == 0, b.output()
        out = b.output()
        b.out.close()
        b.err.close()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(b.dir, ignore_errors=True)
    assert "alice-pw" not in out and "nope" not in out
