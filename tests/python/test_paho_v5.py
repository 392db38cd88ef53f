"""MQTT 5.0 interoperability tests with paho-mqtt 2.x clients (protocol=MQTTv5).

Same conventions as test_paho.py: the broker is the coremq binary from $COREMQ_BIN (default
target/release/coremq, relative to the repository root), started with --backend $COREMQ_BACKEND
(default auto) and --threads 2, here from a generated config file so that tests can set v5 keys.
With COREMQ_TEST_BROKER=mosquitto the same tests run against mosquitto; tests of coremq-only
decisions are skipped there with the reason.
"""

import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

REPO = Path(__file__).resolve().parents[2]
WAIT = 5.0
MOSQUITTO = os.environ.get("COREMQ_TEST_BROKER") == "mosquitto"


def skip_unless_coremq(reason):
    if MOSQUITTO:
        pytest.skip(f"mosquitto: {reason}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A broker on a free loopback port, started from a generated config file; stopped with SIGTERM.

    `coremq` holds top-level TOML lines, `mosquitto` mosquitto.conf lines; `acl` is an ACL file's text
    and `users` (name, password) pairs for a password file, both in mosquitto's formats.
    """

    def __init__(self, coremq=(), mosquitto=(), acl=None, users=()):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="coremq-pytest-v5-")
        self.out = open(os.path.join(self.dir, "stdout"), "w+")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        acl_path = os.path.join(self.dir, "acl")
        pw_path = os.path.join(self.dir, "passwd")
        if acl is not None:
            with open(acl_path, "w") as f:
                f.write(acl)
        for i, (user, password) in enumerate(users):
            subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", pw_path, user, password],
                           check=True, timeout=30, capture_output=True)
        if MOSQUITTO:
            # mosquitto started as root drops to its own user, which must be able to read these.
            os.chmod(self.dir, 0o755)
            for path in (acl_path, pw_path):
                if os.path.exists(path):
                    os.chmod(path, 0o644)
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest stderr\nlog_type error\n")
                f.writelines(line + "\n" for line in mosquitto)
                if acl is not None:
                    f.write(f"acl_file {acl_path}\n")
                if users:
                    f.write(f"password_file {pw_path}\n")
            cmd = ["mosquitto", "-c", conf]
        else:
            binary = Path(os.environ.get("COREMQ_BIN", "target/release/coremq"))
            if not binary.is_absolute():
                binary = REPO / binary
            if not binary.exists():
                pytest.fail(f"coremq binary not found at {binary} (build it or set COREMQ_BIN)")
            conf = os.path.join(self.dir, "coremq.toml")
            with open(conf, "w") as f:
                f.write(f'threads = 2\nbackend = "{os.environ.get("COREMQ_BACKEND", "auto")}"\n')
                f.writelines(line + "\n" for line in coremq)
                f.write(f'\n[[listener]]\nbind = "127.0.0.1:{self.port}"\nallow_anonymous = true\n')
                if acl is not None or users:
                    f.write("\n[auth]\n")
                if acl is not None:
                    f.write('acl_file = "acl"\n')
                if users:
                    f.write('password_file = "passwd"\n')
            cmd = [str(binary), "--config", conf]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err)
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

    def close(self):
        code = self.stop()
        print(self.output())  # shown by pytest for failing tests only
        self.out.close()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        assert code == 0, f"broker did not shut down cleanly ({code})"


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.close()


@pytest.fixture
def make_broker():
    """Factory for a broker with a test-specific configuration (closed at teardown)."""
    made = []

    def make(**kw):
        b = Broker(**kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def props(packet_type, **kw):
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class Client:
    """A connected paho client (v5 unless told otherwise) running its network loop in a thread."""

    def __init__(self, port, client_id=None, protocol=mqtt.MQTTv5, clean_start=True, expiry=None,
                 will=None, credentials=None, connect_props=None, expect_success=True, keepalive=30):
        self.messages = queue.Queue()
        self.events = queue.Queue()
        self.disconnects = queue.Queue()
        self.acks = queue.Queue()
        cid = f"py5-{uuid.uuid4().hex[:8]}" if client_id is None else client_id
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol)
        if will:
            self.c.will_set(*will)
        if credentials:
            self.c.username_pw_set(*credentials)
        self.c.on_connect = lambda c, u, flags, rc, p: self.events.put(("connack", (flags, rc, p)))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", rcs))
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.events.put(("unsuback", rcs))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put((rc, p))
        kw = {}
        if protocol == mqtt.MQTTv5:
            cp = connect_props or Properties(PacketTypes.CONNECT)
            if expiry is not None:
                cp.SessionExpiryInterval = expiry
            kw = {"clean_start": clean_start, "properties": cp}
        else:
            self.c._clean_session = clean_start
        self.c.connect("127.0.0.1", port, keepalive=keepalive, **kw)
        self.c.loop_start()
        kind, (self.flags, self.rc, self.connack_props) = self.events.get(timeout=WAIT)
        assert kind == "connack"
        if expect_success:
            assert not self.rc.is_failure, self.rc

    def suback(self, topic, qos=1, options=None, properties=None):
        if options is not None:
            self.c.subscribe(topic, options=options, properties=properties)
        else:
            self.c.subscribe(topic, qos, properties=properties)
        kind, rcs = self.events.get(timeout=WAIT)
        assert kind == "suback", kind
        return [int(r.value) for r in rcs]

    def subscribe(self, topic, qos=1, options=None, properties=None):
        want = options.QoS if options is not None else qos
        assert self.suback(topic, qos, options, properties) == [want], topic

    def unsubscribe(self, topics):
        self.c.unsubscribe(topics)
        kind, rcs = self.events.get(timeout=WAIT)
        assert kind == "unsuback", kind
        return [int(r.value) for r in (rcs if isinstance(rcs, list) else [rcs])]

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        """Publishes; for QoS 1/2 waits for the acknowledgement and returns its reason code value."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        if qos == 0:
            return None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            mid, rc = self.acks.get(timeout=WAIT)
            if mid == info.mid:
                return int(rc.value)
        pytest.fail(f"no ack callback for mid {info.mid}")

    def recv(self, timeout=WAIT):
        return self.messages.get(timeout=timeout)

    def expect_nothing(self, window=0.3):
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=window)
            pytest.fail(f"unexpected message {msg.topic} {msg.payload!r}")

    def close(self, reason=None, properties=None):
        self.c.disconnect(reasoncode=reason, properties=properties)
        self.c.loop_stop()

    def kill(self):
        """Drops the TCP connection without DISCONNECT."""
        self.c.loop_stop()
        self.c.socket().close()


def v311(port, **kw):
    return Client(port, protocol=mqtt.MQTTv311, **kw)


# --------------------------------------------------------------------------------------------
# CONNECT / CONNACK
# --------------------------------------------------------------------------------------------

def test_connack_assigned_id_and_limits(make_broker):
    b = make_broker(coremq=["max_packet_size = 65536"], mosquitto=["max_packet_size 65536"])
    c = Client(b.port, client_id="")
    p = c.connack_props
    assert getattr(p, "AssignedClientIdentifier", ""), f"assigned client id: {p}"
    assert p.TopicAliasMaximum == 10, p
    assert p.MaximumPacketSize == 65536, p
    assert p.ReceiveMaximum == (20 if MOSQUITTO else 1024), p
    for name in ("WildcardSubscriptionAvailable", "SubscriptionIdentifierAvailable",
                 "SharedSubscriptionAvailable"):
        assert getattr(p, name, 1) == 1, (name, p)
    assert not c.flags.session_present
    c.close()


def test_server_keep_alive(make_broker):
    b = make_broker(coremq=["max_keepalive = 20"], mosquitto=["max_keepalive 20"])
    c = Client(b.port, keepalive=120)
    assert c.connack_props.ServerKeepAlive == 20, c.connack_props
    c.close()


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------

def test_session_expiry(broker):
    cid = "py5-expiry"
    c = Client(broker.port, client_id=cid, expiry=2)
    c.subscribe("pyx/t", 1)
    c.close()
    pub = Client(broker.port)
    pub.publish("pyx/t", b"queued", 1)
    c = Client(broker.port, client_id=cid, clean_start=False, expiry=2)
    assert c.flags.session_present, "reconnect within the expiry interval"
    assert c.recv().payload == b"queued"
    c.close()
    time.sleep(3.5)
    c = Client(broker.port, client_id=cid, clean_start=False, expiry=0)
    assert not c.flags.session_present, "session expired after 2 s"
    c.close()
    # Expiry 0 (the default): nothing survives the connection.
    c = Client(broker.port, client_id=cid, clean_start=False)
    assert not c.flags.session_present
    c.close()
    pub.close()


def test_takeover_disconnect_reason(broker):
    old = Client(broker.port, client_id="py5-take", expiry=60)
    old.subscribe("pytk/t", 1)
    new = Client(broker.port, client_id="py5-take", clean_start=False, expiry=60)
    assert new.flags.session_present
    rc, _ = old.disconnects.get(timeout=WAIT)
    if not MOSQUITTO:  # mosquitto 2.0.11 closes without DISCONNECT
        assert int(rc.value) == 0x8E, rc
    pub = Client(broker.port)
    pub.publish("pytk/t", b"x", 1)
    assert new.recv().payload == b"x"
    new.close(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    old.c.loop_stop()
    pub.close()


# --------------------------------------------------------------------------------------------
# Properties, subscription identifiers, subscribe options
# --------------------------------------------------------------------------------------------

def test_properties_forwarded(broker):
    s5 = Client(broker.port)
    s5.subscribe("pyp/#", 2)
    s4 = v311(broker.port)
    s4.subscribe("pyp/#", 2)
    pub = Client(broker.port)
    users = [("k", "1"), ("z", "2"), ("k", "3"), ("k", "1")]
    for qos in (0, 1, 2):
        p = props(PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="text/plain",
                  ResponseTopic="pyp/reply", CorrelationData=b"\x00\x01id", UserProperty=users)
        pub.publish(f"pyp/{qos}", "ünïcode".encode(), qos, properties=p)
        m = s5.recv()
        assert (m.topic, m.payload, m.qos) == (f"pyp/{qos}", "ünïcode".encode(), qos)
        mp = m.properties
        assert mp.PayloadFormatIndicator == 1
        assert mp.ContentType == "text/plain"
        assert mp.ResponseTopic == "pyp/reply"
        assert mp.CorrelationData == b"\x00\x01id"
        assert mp.UserProperty == users, "user properties in order, repeats kept"
        m = s4.recv()
        assert (m.topic, m.payload, m.qos) == (f"pyp/{qos}", "ünïcode".encode(), qos)
    for c in (s5, s4, pub):
        c.close()


def test_subscription_identifiers(broker):
    s = Client(broker.port)
    s.subscribe("pysid/a", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    pub = Client(broker.port)
    pub.publish("pysid/a", b"x", 1)
    assert s.recv().properties.SubscriptionIdentifier == [7]
    s.close()
    pub.close()


def test_overlapping_subscriptions_one_delivery_both_ids(broker):
    skip_unless_coremq("mosquitto 2.0.11 sends one copy per matching subscription")
    s = Client(broker.port)
    s.subscribe("pyov/+", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=1))
    s.subscribe("pyov/#", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2))
    pub = Client(broker.port)
    pub.publish("pyov/x", b"once", 1)
    m = s.recv()
    assert sorted(m.properties.SubscriptionIdentifier) == [1, 2]
    s.expect_nothing()
    s.close()
    pub.close()


def test_no_local_and_retain_as_published(broker):
    c = Client(broker.port)
    c.subscribe("pynl/t", options=SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True))
    c.publish("pynl/t", b"own", 1)
    c.expect_nothing()
    other = Client(broker.port)
    other.publish("pynl/t", b"kept", 1, retain=True)
    m = c.recv()
    assert (m.payload, m.retain) == (b"kept", True), "retain as published on a live delivery"
    other.publish("pynl/t", b"", 1, retain=True)
    assert c.recv().payload == b""
    c.close()
    other.close()


@pytest.mark.parametrize("handling,first,again", [(0, True, True), (1, True, False), (2, False, False)])
def test_retain_handling(broker, handling, first, again):
    pub = Client(broker.port)
    pub.publish("pyrh/t", b"kept", 1, retain=True)
    c = Client(broker.port)
    for expect in (first, again):
        c.subscribe("pyrh/t", options=SubscribeOptions(qos=1, retainHandling=handling))
        if expect:
            m = c.recv()
            assert (m.payload, m.retain) == (b"kept", True)
        else:
            c.expect_nothing()
    c.close()
    pub.publish("pyrh/t", b"", 1, retain=True)
    pub.close()


# --------------------------------------------------------------------------------------------
# Reason codes
# --------------------------------------------------------------------------------------------

def test_suback_unsuback_puback_reason_codes(broker):
    c = Client(broker.port)
    assert c.suback([("pyrc/a", 2), ("pyrc/+/b", 0)]) == [2, 0]
    # 0x8F for an invalid filter is checked in tests/v5.rs with raw packets: paho refuses to send one.
    assert c.unsubscribe(["pyrc/a", "pyrc/never"]) == [0x00, 0x11]
    pub = Client(broker.port)
    assert pub.publish("pyrc/nobody", b"x", 1) == 0x10, "PUBACK No matching subscribers"
    assert pub.publish("pyrc/x/b", b"x", 1) == 0x00
    c.close()
    pub.close()


def test_acl_reason_codes(make_broker):
    b = make_broker(acl="topic readwrite pyacl/open/#\ntopic read pyacl/ro/#\n")
    c = Client(b.port)
    codes = c.suback([("pyacl/open/#", 1), ("pyacl/ro/#", 1), ("pyacl/secret/#", 1)])
    assert codes[:2] == [1, 1]
    if not MOSQUITTO:  # mosquitto grants the filter and filters at delivery
        assert codes[2] == 0x87, codes
    assert c.publish("pyacl/ro/t", b"denied", 1) == 0x87, "PUBACK Not authorized"
    assert c.publish("pyacl/open/t", b"ok", 1) == 0x00
    assert c.recv().payload == b"ok"
    c.expect_nothing()
    c.close()


def test_bad_password(make_broker):
    b = make_broker(users=[("alice", "alice-pw")])
    bad = Client(b.port, credentials=("alice", "nope"), expect_success=False)
    # mosquitto 2.0.11 answers 0x87 Not authorized; the decision here is 0x86.
    assert int(bad.rc.value) == (0x87 if MOSQUITTO else 0x86), bad.rc
    bad.c.loop_stop()
    bad4 = v311(b.port, credentials=("alice", "nope"), expect_success=False)
    assert int(bad4.rc.value) == 5 or bad4.rc.is_failure, bad4.rc
    bad4.c.loop_stop()
    ok = Client(b.port, credentials=("alice", "alice-pw"))
    ok.close()


def test_authentication_method_refused(broker):
    cp = props(PacketTypes.CONNECT, AuthenticationMethod="SCRAM-SHA-1")
    c = Client(broker.port, connect_props=cp, expect_success=False)
    assert int(c.rc.value) == 0x8C, c.rc
    c.c.loop_stop()


# --------------------------------------------------------------------------------------------
# Will
# --------------------------------------------------------------------------------------------

def test_will_delay_and_properties(broker):
    watch = Client(broker.port)
    watch.subscribe("pywill/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=2, ContentType="application/json",
               UserProperty=[("why", "crash"), ("why", "again")])
    c = Client(broker.port, client_id="py5-will", expiry=10, will=("pywill/t", b"gone", 1, False, wp))
    start = time.monotonic()
    c.kill()
    watch.expect_nothing(1.5)
    m = watch.recv()
    assert time.monotonic() - start >= 1.8
    assert (m.topic, m.payload) == ("pywill/t", b"gone")
    assert m.properties.ContentType == "application/json"
    assert m.properties.UserProperty == [("why", "crash"), ("why", "again")]
    # End the session.
    Client(broker.port, client_id="py5-will").close()
    watch.close()


def test_will_cancelled_by_reconnect(broker):
    watch = Client(broker.port)
    watch.subscribe("pywc/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=2)
    c = Client(broker.port, client_id="py5-wc", expiry=10, will=("pywc/t", b"gone", 1, False, wp))
    c.kill()
    time.sleep(0.5)
    c = Client(broker.port, client_id="py5-wc", clean_start=False, expiry=10)
    assert c.flags.session_present
    watch.expect_nothing(2.5)
    c.close(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    watch.close()


@pytest.mark.parametrize("reason,published", [(0x00, False), (0x04, True)])
def test_disconnect_reason_and_will(broker, reason, published):
    watch = Client(broker.port)
    watch.subscribe("pyw4/#", 1)
    c = Client(broker.port, will=("pyw4/t", b"gone", 1, False))
    c.close(reason=ReasonCode(PacketTypes.DISCONNECT, identifier=reason))
    if published:
        assert watch.recv().topic == "pyw4/t"
    else:
        watch.expect_nothing()
    watch.close()


# --------------------------------------------------------------------------------------------
# Shared subscriptions
# --------------------------------------------------------------------------------------------

def drain(clients, total, timeout=WAIT):
    """Collects messages from `clients` until `total` arrived, then a short quiet window."""
    got = [[] for _ in clients]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < total and time.monotonic() < deadline:
        for i, c in enumerate(clients):
            try:
                got[i].append(c.messages.get(timeout=0.01).payload)
            except queue.Empty:
                pass
    time.sleep(0.3)
    for i, c in enumerate(clients):
        while not c.messages.empty():
            got[i].append(c.messages.get_nowait().payload)
    return got


def test_shared_subscriptions_v5_and_v311(broker):
    # Group a: two v5 and one 3.1.1 member; group b: one v5 and one 3.1.1; a plain subscriber.
    a = [Client(broker.port, client_id=f"py5-sha-{i}") for i in range(2)]
    a.append(v311(broker.port, client_id="py4-sha"))
    bgrp = [Client(broker.port, client_id="py5-shb"), v311(broker.port, client_id="py4-shb")]
    for c in a:
        c.subscribe("$share/a/pysh/#", 1)
    for c in bgrp:
        c.subscribe("$share/b/pysh/+", 1)
    plain = Client(broker.port)
    plain.subscribe("pysh/#", 1)
    pub = Client(broker.port)
    n = 120
    for i in range(n):
        pub.publish("pysh/t", str(i).encode(), 1)
    want = sorted(str(i).encode() for i in range(n))
    for name, group in (("a", a), ("b", bgrp), ("plain", [plain])):
        per = drain(group, n)
        assert sorted(sum(per, [])) == want, f"group {name}: each message exactly once"
        if name == "b":
            assert all(len(x) >= 24 for x in per), f"group b balanced: {[len(x) for x in per]}"
    # A member leaving stops receiving at once.
    for c in bgrp[1:]:
        c.close()
    for i in range(20):
        pub.publish("pysh/u", str(i).encode(), 1)
    assert len(drain(bgrp[:1], 20)[0]) == 20
    for c in a + bgrp[:1] + [plain, pub]:
        c.close()


# --------------------------------------------------------------------------------------------
# Request / response, interop
# --------------------------------------------------------------------------------------------

def test_response_information(make_broker):
    skip_unless_coremq("mosquitto 2.0.11 never sends Response Information")
    b = make_broker(coremq=['response_information = "replies/"'])
    asked = Client(b.port, connect_props=props(PacketTypes.CONNECT, RequestResponseInformation=1))
    assert asked.connack_props.ResponseInformation == "replies/"
    plain = Client(b.port)
    assert not hasattr(plain.connack_props, "ResponseInformation"), plain.connack_props
    asked.close()
    plain.close()


def test_request_response_round_trip(broker):
    responder = Client(broker.port)
    responder.subscribe("pyreq/service", 1)
    requester = Client(broker.port)
    requester.subscribe("pyreq/reply/me", 1)
    request = props(PacketTypes.PUBLISH, ResponseTopic="pyreq/reply/me", CorrelationData=b"42")
    requester.publish("pyreq/service", b"ping", 1, properties=request)
    req = responder.recv()
    responder.publish(req.properties.ResponseTopic, b"pong", 1,
                      properties=props(PacketTypes.PUBLISH, CorrelationData=req.properties.CorrelationData))
    rep = requester.recv()
    assert (rep.topic, rep.payload, rep.properties.CorrelationData) == ("pyreq/reply/me", b"pong", b"42")
    responder.close()
    requester.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_interop_v311_v5(broker, qos):
    s5 = Client(broker.port)
    s5.subscribe("pyio/from4", qos)
    s4 = v311(broker.port)
    s4.subscribe("pyio/from5", qos)
    p4 = v311(broker.port)
    p5 = Client(broker.port)
    p4.publish("pyio/from4", b"four", qos)
    p5.publish("pyio/from5", b"five", qos, properties=props(PacketTypes.PUBLISH, UserProperty=[("a", "b")]))
    m = s5.recv()
    assert (m.topic, m.payload, m.qos) == ("pyio/from4", b"four", qos)
    m = s4.recv()
    assert (m.topic, m.payload, m.qos) == ("pyio/from5", b"five", qos)
    for c in (s5, s4, p4, p5):
        c.close()
