#!/usr/bin/env bash
# What persistence costs: QoS 1 throughput to persistent subscribers with each fsync policy of coremq's
# [persistence] table, beside coremq without persistence and mosquitto with `persistence false` / `true`;
# then recovery time (broker start until it answers a CONNECT with CONNACK) for a data directory holding
# many retained messages, and one holding many persistent sessions with queued messages, for both brokers.
#
#   scripts/persist_bench.sh [--duration SECS] [--quick] [--only REGEX]
#
# --quick: 2 s runs, 10k retained messages, 2k sessions (a smoke run); the full run uses 1M retained
# messages and 100k sessions with 5 queued messages each and takes several minutes and a few GB of disk.
# --only REGEX runs just the rows whose label matches (bash regex), e.g. --only recovery.
#
# Read the mosquitto rows with care: mosquitto's `persistence true` writes a snapshot of its whole state
# every `autosave_interval` seconds (default 1800) and at shutdown, never per message, so its throughput
# row pays nothing for durability and a crash loses everything since the last snapshot; coremq appends
# every change to a per-core log (fsync "always": before the PUBACK; "interval": every
# fsync_interval_ms; "never": left to the kernel).
#
# Environment: BROKER_CPU (default 0), SWARM_CPU (default 1), PAYLOAD (default 64), CONNECTIONS (pairs;
# default 16).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=5
WARMUP=1
ONLY=""
N_RETAINED=1000000
N_SESSIONS=100000
QUEUED_PER_SESSION=5
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --quick) DURATION=2; N_RETAINED=10000; N_SESSIONS=2000; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration SECS] [--quick] [--only REGEX]" >&2; exit 2 ;;
  esac
done
BROKER_CPU=${BROKER_CPU:-0}
SWARM_CPU=${SWARM_CPU:-1}
PAYLOAD=${PAYLOAD:-64}
CONNECTIONS=${CONNECTIONS:-16}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

echo "== building coremq and coremq-swarm (release)" >&2
cargo build --release -q -p coremq -p coremq-swarm
COREMQ=$PWD/target/release/coremq
SWARM=$PWD/target/release/coremq-swarm

WORK=$(mktemp -d)
# mosquitto started as root drops privileges to user "mosquitto", which must reach its persistence dir.
chmod 755 "$WORK"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${BROKER_PID:-}" ] && kill -9 "$BROKER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

selected() { [ -z "$ONLY" ] || [[ $1 =~ $ONLY ]]; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The small MQTT 3.1.1 client used to populate data directories and to time recovery (no dependencies).
cat >"$WORK/mqtt.py" <<'EOF'
import asyncio, os, socket, struct, subprocess, sys, time

def rl(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)

def pkt(first, body):
    return bytes([first]) + rl(len(body)) + body

def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x

def connect(cid, clean):
    return pkt(0x10, s("MQTT") + bytes([4, 2 if clean else 0]) + struct.pack(">H", 60) + s(cid))

def publish(topic, qos, retain, pkid, payload):
    return pkt(0x30 | (qos << 1) | int(retain), s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload)

def subscribe(pkid, topic, qos):
    return pkt(0x82, struct.pack(">H", pkid) + s(topic) + bytes([qos]))

DISCONNECT = b"\xe0\x00"

def read_packet(sock):
    def exact(n):
        b = b""
        while len(b) < n:
            c = sock.recv(n - len(b))
            if not c:
                raise EOFError("closed")
            b += c
        return b
    first = exact(1)[0]
    n, shift = 0, 0
    while True:
        b = exact(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, exact(n)

def client(port, cid, clean=True, wait=60):
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    sock.sendall(connect(cid, clean))
    first, body = read_packet(sock)
    assert first == 0x20 and body[1] == 0, (first, body)
    return sock, bool(body[0] & 1)

def sync(sock, topic):
    """A QoS 1 publish after everything else on this connection: its PUBACK orders them all."""
    sock.sendall(publish(topic, 1, False, 1, b"sync"))
    while True:
        first, body = read_packet(sock)
        if first == 0x40:
            return

def retained(port, n, payload):
    sock, _ = client(port, "bench-retained-pub")
    body = b"x" * payload
    batch = []
    for i in range(n):
        batch.append(publish(f"bench/r/{i}", 0, True, 0, body))
        if len(batch) == 1000:
            sock.sendall(b"".join(batch))
            batch = []
    sock.sendall(b"".join(batch))
    sync(sock, "bench/r-sync")
    sock.sendall(DISCONNECT)
    sock.close()

async def one_session(port, i, sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(connect(f"bench-s-{i}", False) + subscribe(1, "bench/s/all", 1) + DISCONNECT)
        await w.drain()
        await r.read()  # CONNACK, SUBACK, then the broker closes: the session is stored
        w.close()

async def sessions_async(port, n):
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(one_session(port, i, sem) for i in range(n)))

def sessions(port, n, queued, payload):
    asyncio.run(sessions_async(port, n))
    sock, _ = client(port, "bench-session-pub")
    for k in range(queued):
        sock.sendall(publish("bench/s/all", 1, False, k + 1, b"q" * payload))
        while read_packet(sock)[0] != 0x40:
            pass
    sock.sendall(DISCONNECT)
    sock.close()

def startwait(pidfile, log, cmd):
    """Starts the broker and prints the seconds until it answers a CONNECT."""
    t0 = time.monotonic()
    out = open(log, "w")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    open(pidfile, "w").write(str(p.pid))
    port = int(os.environ["PORT"])
    deadline = t0 + 1800
    while time.monotonic() < deadline:
        if p.poll() is not None:
            sys.exit(f"broker exited with {p.returncode} during startup; see {log}")
        try:
            sock, _ = client(port, "bench-probe")
            sock.close()
            print(f"{time.monotonic() - t0:.3f}")
            return
        except (OSError, EOFError, AssertionError):
            time.sleep(0.002)
    sys.exit("broker did not answer within 30 min")

def check(port, kind, n, queued):
    """After recovery: the last retained message / the last session and its queue are there."""
    try:
        print("ok" if check_inner(port, kind, n, queued) else "MISSING")
    except (OSError, EOFError, AssertionError):
        print("MISSING")

def check_inner(port, kind, n, queued):
    if kind == "retained":
        sock, _ = client(port, "bench-check", wait=10)
        sock.sendall(subscribe(1, f"bench/r/{n - 1}", 0))
        got = [read_packet(sock) for _ in range(2)]
        ok = any(f >> 4 == 3 for f, _ in got)
    else:
        sock, present = client(port, f"bench-s-{n - 1}", clean=False, wait=10)
        ok = present
        for _ in range(queued if present else 0):
            f, body = read_packet(sock)
            ok = ok and f >> 4 == 3
            tl = struct.unpack(">H", body[:2])[0]
            sock.sendall(pkt(0x40, body[2 + tl:4 + tl]))
    sock.close()
    return ok

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "retained":
        retained(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "sessions":
        sessions(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "startwait":
        startwait(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif cmd == "check":
        check(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
EOF

# broker_cmd KIND PORT DATADIR -> prints nothing; sets CMD (array) for: coremq-off, coremq-always,
# coremq-interval, coremq-never, mosquitto-off, mosquitto-on. Everything on one core.
broker_cmd() {
  local kind=$1 port=$2 data=$3
  mkdir -p "$data"
  case "$kind" in
    coremq-*)
      local policy=${kind#coremq-}
      : >"$data/coremq.toml"
      if [ "$policy" != off ]; then
        printf '[persistence]\nenabled = true\ndata_dir = "data"\nfsync = "%s"\nfsync_interval_ms = 1000\n' \
          "$policy" >"$data/coremq.toml"
      fi
      # The offline queues of the recovery rows must hold every message (default 1000 per session).
      CMD=("$COREMQ" --config "$data/coremq.toml" --listen "127.0.0.1:$port" --threads 1 --cpus "$BROKER_CPU"
           --max-queued-messages 100000) ;;
    mosquitto-*)
      chmod 777 "$data"
      printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n' "$port" >"$data/mosq.conf"
      if [ "$kind" = mosquitto-on ]; then
        printf 'persistence true\npersistence_location %s/\n' "$data" >>"$data/mosq.conf"
      else
        printf 'persistence false\n' >>"$data/mosq.conf"
      fi
      CMD=(taskset -c "$BROKER_CPU" "$MOSQUITTO" -c "$data/mosq.conf") ;;
  esac
}

# start KIND PORT DATADIR -> sets BROKER_PID and STARTUP (seconds until CONNACK)
start() {
  broker_cmd "$1" "$2" "$3"
  STARTUP=$(PORT=$2 python3 "$WORK/mqtt.py" startwait "$WORK/pid" "$3/broker.log" "${CMD[@]}")
  BROKER_PID=$(cat "$WORK/pid")
}

stop() {
  kill -TERM "$BROKER_PID" 2>/dev/null || true
  for _ in $(seq 1 6000); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$BROKER_PID" 2>/dev/null || true
  BROKER_PID=""
}

touch "$WORK/rows"
row() { printf '%s\n' "$*" >>"$WORK/rows"; }

# --- throughput: QoS 1 pairs whose subscribers have persistent sessions ------------------------------
KINDS=(coremq-off coremq-always coremq-interval coremq-never mosquitto-off mosquitto-on)
for scenario in "pairs" "pairs x 2000/s" "fan-out"; do
  label="qos1 $scenario, persistent subscribers"
  selected "$label" || continue
  for kind in "${KINDS[@]}"; do
    echo "== $label on $kind" >&2
    port=$(free_port); data="$WORK/tp-$kind-$scenario"
    start "$kind" "$port" "$data"
    case "$scenario" in
      pairs) args=(--scenario pairs --connections "$CONNECTIONS") ;;
      # Below every broker's capacity: latency is the cost of the write path, not of a backlog.
      "pairs x 2000/s") args=(--scenario pairs --connections "$CONNECTIONS" --rate 2000) ;;
      *) args=(--scenario fan-out --subscribers 16) ;;
    esac
    json=$("$SWARM" --port "$port" --cpus "$SWARM_CPU" --threads 1 --payload "$PAYLOAD" --qos 1 --persistent \
             --duration "$DURATION" --warmup "$WARMUP" --json "${args[@]}" 2>"$WORK/swarm.err" | grep '^{"scenario"' || true)
    stop
    if [ -z "$json" ]; then
      echo "swarm failed on $kind:" >&2; tail -3 "$WORK/swarm.err" >&2; json='{}'
    fi
    row "tp|$label|$kind|$json|$(du -sk "$data" | cut -f1)"
  done
done

# --- recovery --------------------------------------------------------------------------------------
recovery() {
  local what=$1 kind=$2 n=$3
  local port data populate startup1 startup2 size verdict
  port=$(free_port); data="$WORK/rec-$what-$kind"
  start "$kind" "$port" "$data"; startup1=$STARTUP
  local t0; t0=$(date +%s.%N)
  if [ "$what" = retained ]; then
    python3 "$WORK/mqtt.py" retained "$port" "$n" "$PAYLOAD"
  else
    python3 "$WORK/mqtt.py" sessions "$port" "$n" "$QUEUED_PER_SESSION" "$PAYLOAD"
  fi
  populate=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  stop
  size=$(du -sk "$data" | cut -f1)
  start "$kind" "$port" "$data"; startup2=$STARTUP
  verdict=$(python3 "$WORK/mqtt.py" check "$port" "$what" "$n" "$QUEUED_PER_SESSION" 2>&1 | tail -1)
  stop
  row "rec|$what|$kind|$n|$startup1|$startup2|$populate|$size|$verdict"
}
if selected "recovery retained"; then
  for kind in coremq-always mosquitto-on; do
    echo "== recovery: $N_RETAINED retained messages on $kind" >&2
    recovery retained "$kind" "$N_RETAINED"
  done
fi
if selected "recovery sessions"; then
  for kind in coremq-always mosquitto-on; do
    echo "== recovery: $N_SESSIONS sessions x $QUEUED_PER_SESSION queued on $kind" >&2
    recovery sessions "$kind" "$N_SESSIONS"
  done
fi

python3 - "$WORK/rows" "$DURATION" "$CONNECTIONS" <<'EOF'
import json, sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
tp = [r for r in rows if r[0] == "tp"]
if tp:
    print(f"QoS 1 throughput, {sys.argv[2]} s per row, broker on one core, subscribers with persistent sessions")
    hdr = f'{"scenario":<45} {"broker":<18} {"msgs/s":>10} {"p50 us":>8} {"p99 us":>8} {"lost":>6} {"disk KiB":>9}'
    print(hdr); print("-" * len(hdr))
    for _, label, kind, js, disk in tp:
        r = json.loads(js or "{}")
        print(f'{label:<45} {kind:<18} {r.get("recv_rate", 0):>10.0f} {r.get("lat_p50_us", 0):>8} '
              f'{r.get("lat_p99_us", 0):>8} {r.get("lost", 0):>6} {disk:>9}')
    print("mosquitto-on snapshots every autosave_interval (1800 s) and at shutdown: it wrote nothing per "
          "message during these runs.")
    print("Unlimited-rate rows measure a backlog: publishers outrun the subscribers, latency grows to seconds, "
          "and 'lost' counts messages\nnot received within the swarm's 2 s drain (not necessarily lost by the "
          "broker); the rated row shows the write path's latency.")
rec = [r for r in rows if r[0] == "rec"]
if rec:
    print()
    print("Recovery: seconds from process start until a CONNECT is answered (empty data dir, then after the "
          "populated restart)")
    hdr = (f'{"state":<34} {"broker":<16} {"empty s":>8} {"recover s":>10} {"populate s":>11} '
           f'{"disk MiB":>9} {"check":>8}')
    print(hdr); print("-" * len(hdr))
    for _, what, kind, n, s1, s2, pop, size, verdict in rec:
        state = f"{int(n):,} retained" if what == "retained" else f"{int(n):,} sessions x 5 queued"
        print(f'{state:<34} {kind:<16} {float(s1):>8.3f} {float(s2):>10.3f} {float(pop):>11.1f} '
              f'{int(size) / 1024:>9.1f} {verdict:>8}')
EOF
