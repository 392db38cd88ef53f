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

    def __init__(self, extra_args=(), listen=True, port=None):
        # listen=False leaves the listeners to a --config file in extra_args (--listen would replace
        # them); `port` must then be one of its plain listeners, the one readiness is probed on.
        self.port = port or free_port()
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
            listen_args = ["--listen", f"127.0.0.1:{self.port}"] if listen else []
            cmd = [str(binary), *listen_args, "--threads", "2",
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

    def __init__(self, port, protocol, client_id=None, will=None, credentials=None, tls_ca=None):
        self.messages = queue.Queue()
        self.events = queue.Queue()
        cid = client_id or f"py-{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol)
        if will:
            self.c.will_set(*will)
        if credentials:
            self.c.username_pw_set(*credentials)
        if tls_ca:
            self.c.tls_set(ca_certs=tls_ca)
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


def stop_and_clean(b, extra_dir):
    """Stops a test's own broker (asserting a clean exit), removes its files; returns its output."""
    assert b.stop() == 0, b.output()
    out = b.output()
    b.out.close()
    b.err.close()
    shutil.rmtree(extra_dir, ignore_errors=True)
    shutil.rmtree(b.dir, ignore_errors=True)
    return out


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
        out = stop_and_clean(b, d)
    assert "alice-pw" not in out and "nope" not in out


def make_pki(d):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it, as PEM files in `d`;
    returns the CA certificate's path."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def builder(subject, issuer, key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - day).not_valid_after(now + day)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coremq paho test CA")])
    ca = (builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key)
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                           **usage), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(os.path.join(d, "server.pem"), "wb") as f:
        f.write(server.public_bytes(pem))
    with open(os.path.join(d, "server.key"), "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return os.path.join(d, "ca.pem")


@pytest.mark.parametrize("proto", list(PROTOCOLS))
def test_tls_listener(proto):
    """paho over TLS (tls_set with our CA) on an mqtts listener beside a plain one."""
    if os.environ.get("COREMQ_TEST_BROKER") == "mosquitto":
        pytest.skip("uses coremq's listener config")
    pytest.importorskip("cryptography")
    import ssl

    d = tempfile.mkdtemp(prefix="coremq-pytest-tls-")
    ca = make_pki(d)
    plain = free_port()
    tls = free_port()
    while tls == plain:
        tls = free_port()
    conf = os.path.join(d, "coremq.toml")
    with open(conf, "w") as f:
        f.write(f'[[listener]]\nbind = "127.0.0.1:{plain}"\nallow_anonymous = true\n\n'
                f'[[listener]]\nbind = "127.0.0.1:{tls}"\nprotocol = "mqtts"\n'
                'tls_cert = "server.pem"\ntls_key = "server.key"\nallow_anonymous = true\n')
    # Readiness is probed on the plain port, so no probe ever counts as a failed handshake.
    b = Broker(["--config", conf], listen=False, port=plain)
    try:
        sub = Client(tls, PROTOCOLS[proto], tls_ca=ca)
        assert sub.c.socket().version() in ("TLSv1.2", "TLSv1.3"), sub.c.socket().version()
        sub.subscribe("tls/#", 1)
        pub = Client(tls, PROTOCOLS[proto], tls_ca=ca)
        plain_pub = Client(plain, PROTOCOLS[proto])
        big = os.urandom(100_000)  # several TLS records
        pub.publish("tls/a", b"over-tls", 1)
        pub.publish("tls/big", big, 1)
        plain_pub.publish("tls/b", b"from-plain", 1)
        got = sorted((m.topic, m.payload) for m in (sub.recv(), sub.recv(), sub.recv()))
        assert got == [("tls/a", b"over-tls"), ("tls/b", b"from-plain"), ("tls/big", big)], \
            [(t, p[:20]) for t, p in got]
        sub.expect_nothing()
        # A client that does not trust the server's certificate gives up during the handshake.
        bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-untrusting", protocol=PROTOCOLS[proto])
        os.mkdir(os.path.join(d, "other"))
        bad.tls_set(ca_certs=make_pki(os.path.join(d, "other")))  # an unrelated CA
        with pytest.raises(ssl.SSLError):
            bad.connect("127.0.0.1", tls, keepalive=30)
        # Plain MQTT on the TLS port gets nowhere either.
        with socket.create_connection(("127.0.0.1", tls), timeout=WAIT) as s:
            s.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
            s.settimeout(WAIT)
            try:
                reply = s.recv(16)
            except ConnectionResetError:
                reply = b""
            assert reply[:1] in (b"", b"\x15"), reply  # closed, at most after a TLS alert
        for c in (sub, pub, plain_pub):
            c.close()
    finally:
        out = stop_and_clean(b, d)
    all_block = out[out.index("\nall:"):]
    assert "TLS handshake failed 2" in all_block, out
