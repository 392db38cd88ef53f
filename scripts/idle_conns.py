#!/usr/bin/env python3
"""Opens N idle MQTT 3.1.1 connections to a broker and holds them (the client of scripts/idle_cpu.sh).

    scripts/idle_conns.py --port PORT [--host 127.0.0.1] [--conns N] [--window W] [--timeout SECS]
                          [--keepalive SECS] [--prefix ID]

Each connection sends one CONNECT (clean session, keep-alive --keepalive, client id PREFIX-i) and reads
its CONNACK, which must carry return code 0; after that it sends nothing. At most W connections are in
their handshake at once, so the broker's listen backlog is never overrun, and the whole connect phase
must finish within --timeout seconds. When all N are connected it prints one line
`ready conns=N connect_s=X` on stdout and then waits (in epoll, costing the broker nothing) until
SIGTERM or SIGINT. It watches every socket meanwhile: the broker closing one, or sending anything on
one, is counted. On the signal it sends DISCONNECT on every connection, closes them, prints
`idle_conns: held=N closed_by_broker=K unexpected_data=U` on stderr and exits 1 if K or U is not 0.

Exit status: 0 all held; 1 a failure (messages on stderr). Standard library only.
"""
import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time


def remaining_length(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def connect_packet(client_id, keepalive):
    # Protocol name "MQTT", level 4 (3.1.1), flags 0x02 (clean session), keep-alive, client id.
    body = mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", keepalive) + mqtt_str(client_id)
    return bytes([0x10]) + remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"
CONNACK_LEN = 4  # 0x20 0x02 <session present> <return code>


def die(msg):
    print(f"idle_conns: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


class Conn:
    __slots__ = ("sock", "idx", "out", "buf", "state", "t0")

    def __init__(self, sock, idx, out):
        self.sock, self.idx, self.out = sock, idx, out
        self.buf = b""
        self.state = "connecting"  # -> "awaiting_connack" -> "idle" | "closed"
        self.t0 = time.monotonic()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--window", type=int, default=256, help="handshakes in flight at once")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on the whole connect phase, s")
    ap.add_argument("--keepalive", type=int, default=60)
    ap.add_argument("--prefix", default=f"idle-{os.getpid()}")
    a = ap.parse_args()
    if a.conns < 1 or a.window < 1:
        die("--conns and --window must be at least 1")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = a.conns + 64
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            die(f"open files hard limit {hard} is below the {need} needed for {a.conns} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    stop = False

    def on_signal(_sig, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sel = selectors.DefaultSelector()
    conns = []
    in_flight = 0
    next_idx = 0
    connected = 0
    bad_rc = {}  # return code -> count
    t_start = time.monotonic()
    deadline = t_start + a.timeout
    last_report = t_start

    def fail_conn(c, why):
        die(f"connection {c.idx} ({a.prefix}-{c.idx}): {why} "
            f"(after {connected} of {a.conns} connected, {time.monotonic() - t_start:.1f} s)")

    # Connect phase: keep up to `window` handshakes in flight until all N have their CONNACK.
    while connected + sum(bad_rc.values()) < a.conns:
        if stop:
            die(f"interrupted during the connect phase ({connected} of {a.conns} connected)")
        now = time.monotonic()
        if now > deadline:
            die(f"connect phase exceeded {a.timeout:.0f} s: {connected} of {a.conns} connected, "
                f"{in_flight} handshakes pending")
        if now - last_report >= 5:
            print(f"idle_conns: {connected} of {a.conns} connected ({now - t_start:.0f} s)",
                  file=sys.stderr, flush=True)
            last_report = now
        while in_flight < a.window and next_idx < a.conns:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = s.connect_ex((a.host, a.port))
            if rc not in (0, errno.EINPROGRESS):
                die(f"connect #{next_idx}: {os.strerror(rc)}")
            c = Conn(s, next_idx, connect_packet(f"{a.prefix}-{next_idx}", a.keepalive))
            conns.append(c)
            sel.register(s, selectors.EVENT_WRITE, c)
            next_idx += 1
            in_flight += 1
        for key, _ev in sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
            c = key.data
            if c.state == "connecting":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail_conn(c, f"TCP connect failed: {os.strerror(err)}")
                try:
                    n = c.sock.send(c.out)
                except OSError as e:
                    fail_conn(c, f"sending CONNECT: {e}")
                c.out = c.out[n:]
                if not c.out:
                    c.state = "awaiting_connack"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            elif c.state == "awaiting_connack":
                try:
                    data = c.sock.recv(64)
                except OSError as e:
                    fail_conn(c, f"reading CONNACK: {e}")
                if not data:
                    fail_conn(c, "broker closed the connection before CONNACK")
                c.buf += data
                if len(c.buf) < CONNACK_LEN:
                    continue
                if c.buf[0] != 0x20 or c.buf[1] != 0x02:
                    fail_conn(c, f"expected CONNACK, got bytes {c.buf[:8].hex()}")
                if len(c.buf) > CONNACK_LEN:
                    fail_conn(c, f"unexpected bytes after CONNACK: {c.buf[CONNACK_LEN:][:16].hex()}")
                rc = c.buf[3]
                in_flight -= 1
                if rc != 0:
                    bad_rc[rc] = bad_rc.get(rc, 0) + 1
                    sel.unregister(c.sock)
                    c.sock.close()
                    c.state = "closed"
                    continue
                c.state = "idle"
                c.buf = b""
                connected += 1
            else:
                fail_conn(c, f"event in state {c.state}")

    if bad_rc:
        codes = ", ".join(f"return code {rc}: {n}" for rc, n in sorted(bad_rc.items()))
        die(f"{sum(bad_rc.values())} of {a.conns} CONNACKs refused the connection ({codes})")

    connect_s = time.monotonic() - t_start
    print(f"ready conns={connected} connect_s={connect_s:.2f}", flush=True)

    # Idle phase: send nothing; only watch for the broker closing a connection or sending something.
    closed_by_broker = 0
    unexpected = 0
    first_loss = None
    while not stop:
        for key, _ev in sel.select(timeout=0.5):
            c = key.data
            try:
                data = c.sock.recv(4096)
            except OSError:
                data = b""
            if data:
                unexpected += 1
                if first_loss is None:
                    first_loss = f"connection {c.idx}: broker sent {data[:16].hex()}"
                continue  # keep the connection; it is counted
            closed_by_broker += 1
            if first_loss is None:
                first_loss = (f"connection {c.idx}: closed by the broker "
                              f"{time.monotonic() - c.t0:.1f} s after it was opened")
            sel.unregister(c.sock)
            c.sock.close()
            c.state = "closed"

    held = 0
    for c in conns:
        if c.state != "idle":
            continue
        held += 1
        try:
            c.sock.send(DISCONNECT)
        except OSError:
            pass
        c.sock.close()
    sel.close()
    print(f"idle_conns: held={held} closed_by_broker={closed_by_broker} unexpected_data={unexpected}",
          file=sys.stderr, flush=True)
    if closed_by_broker or unexpected:
        die(f"the broker did not leave every idle connection alone; first: {first_loss}")


if __name__ == "__main__":
    main()
