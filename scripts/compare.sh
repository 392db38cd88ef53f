#!/usr/bin/env bash
# Runs coremq and mosquitto one after the other, each pinned to the same single core with the publisher
# swarm pinned to another, over the same scenarios, and prints one table: delivered msgs/s, latency
# percentiles, broker CPU µs per delivered message (utime+stime from /proc), broker RSS, and the
# coremq/mosquitto ratio of each row. Then rows over TLS (a throwaway CA and server certificate made
# with openssl; coremq's rustls against mosquitto's OpenSSL) and one row of coremq on 2 threads.
#
#   scripts/compare.sh [--duration SECS] [--quick] [--only REGEX]
#
# --only REGEX runs just the rows whose label matches (bash regex), e.g. --only TLS.
#
# Environment: BROKER_CPU (default 0), SWARM_CPU (default 1), PAYLOAD (default 64), QUEUED (each
# broker's max_queued_messages; default: unset, so both run with their defaults of 1000, and under a
# flood mosquitto drops the newest QoS 1/2 messages while coremq pauses the publishers instead).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=5
WARMUP=1
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --quick) DURATION=2; WARMUP=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration SECS] [--quick] [--only REGEX]" >&2; exit 2 ;;
  esac
done
BROKER_CPU=${BROKER_CPU:-0}
SWARM_CPU=${SWARM_CPU:-1}
PAYLOAD=${PAYLOAD:-64}
QUEUED=${QUEUED:-}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

echo "== building coremq and coremq-swarm (release)" >&2
cargo build --release -q -p coremq -p coremq-swarm
COREMQ=target/release/coremq
SWARM=target/release/coremq-swarm

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# cpu_ticks PID -> utime+stime in clock ticks
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

wait_port() {
  for _ in $(seq 1 250); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2).close()" 2>/dev/null; then return 0; fi
    sleep 0.02
  done
  echo "broker did not start on port $1" >&2; return 1
}

# selected LABEL -> true if --only lets the row run
selected() { [ -z "$ONLY" ] || [[ $1 =~ $ONLY ]]; }

# make_certs -> a throwaway CA ($WORK/tls/ca.pem) and a server certificate for IP 127.0.0.1 signed by
# it ($WORK/tls/server.pem, server.key), made once. ECDSA P-256, as a modern deployment would use.
TLS_DIR="$WORK/tls"
make_certs() {
  [ -f "$TLS_DIR/server.pem" ] && return 0
  command -v openssl >/dev/null 2>&1 || { echo "openssl is needed for the TLS rows" >&2; return 1; }
  mkdir -p "$TLS_DIR"
  # The broker may drop privileges (mosquitto does, to user mosquitto) before reading its certificate.
  chmod 755 "$WORK" "$TLS_DIR"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" -days 2 \
    -subj "/CN=compare.sh throwaway CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new "${ec[@]}" -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" \
    -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    >"$TLS_DIR/server.ext"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 2 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.pem" 2>/dev/null
  chmod 644 "$TLS_DIR/server.key"
}

# start_broker NAME PORT THREADS TLS(0|1) -> sets BROKER_PID
start_broker() {
  local name=$1 port=$2 threads=$3 tls=$4
  case "$name" in
    coremq)
      local cpus="$BROKER_CPU"
      [ "$threads" -gt 1 ] && cpus="0-$((threads - 1))"
      local listen=(--listen "127.0.0.1:$port")
      if [ "$tls" = 1 ]; then
        # TLS listeners exist only in the config file; the flags below still set the rest.
        printf '[[listener]]\nbind = "127.0.0.1:%s"\nprotocol = "mqtts"\ntls_cert = "%s"\ntls_key = "%s"\n' \
          "$port" "$TLS_DIR/server.pem" "$TLS_DIR/server.key" >"$WORK/coremq.toml"
        listen=(--config "$WORK/coremq.toml")
      fi
      "$COREMQ" "${listen[@]}" --threads "$threads" --cpus "$cpus" \
        ${QUEUED:+--max-queued-messages "$QUEUED"} >"$WORK/broker.out" 2>"$WORK/broker.err" &
      BROKER_PID=$! ;;
    mosquitto)
      printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" >"$WORK/mosq.conf"
      [ -n "$QUEUED" ] && printf 'max_queued_messages %s\n' "$QUEUED" >>"$WORK/mosq.conf"
      if [ "$tls" = 1 ]; then
        printf 'certfile %s\nkeyfile %s\n' "$TLS_DIR/server.pem" "$TLS_DIR/server.key" >>"$WORK/mosq.conf"
      fi
      taskset -c "$BROKER_CPU" "$MOSQUITTO" -c "$WORK/mosq.conf" >"$WORK/broker.out" 2>&1 &
      BROKER_PID=$! ;;
  esac
  wait_port "$port"
}

stop_broker() { kill -TERM "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; }

# run_one BROKER THREADS TLS(0|1) LABEL SWARM-ARGS... -> appends a JSON row to $WORK/rows
run_one() {
  local broker=$1 threads=$2 tls=$3 label=$4; shift 4
  local port; port=$(free_port)
  start_broker "$broker" "$port" "$threads" "$tls"
  local tls_args=()
  [ "$tls" = 1 ] && tls_args=(--tls-ca "$TLS_DIR/ca.pem")
  local t0 base json
  t0=$(cpu_ticks "$BROKER_PID")
  base=$(rss_kb "$BROKER_PID")
  # Peak RSS while the swarm runs, sampled every 100 ms.
  ( peak=0; while kill -0 "$BROKER_PID" 2>/dev/null; do
      r=$(rss_kb "$BROKER_PID" 2>/dev/null || echo 0); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" >"$WORK/peak"
      sleep 0.1; done ) &
  local sampler=$!
  # Connection storms: also the RSS while the connections are held and idle, halfway through the hold
  # (the swarm says "holding" once all are connected); the peak also counts the storm's own transients.
  local held_sampler=""
  if [[ " $* " == *" storm "* ]]; then
    ( for _ in $(seq 300); do grep -q holding "$WORK/swarm.err" 2>/dev/null && break; sleep 0.1; done
      sleep "$(python3 -c "print($DURATION / 2)")"
      rss_kb "$BROKER_PID" >"$WORK/held" 2>/dev/null ) &
    held_sampler=$!
  fi
  json=$("$SWARM" --port "$port" --cpus "$SWARM_CPU" --threads 1 --payload "$PAYLOAD" \
           --duration "$DURATION" --warmup "$WARMUP" --json "${tls_args[@]}" "$@" 2>"$WORK/swarm.err" | grep '^{"scenario"' || true)
  local t1 rss
  t1=$(cpu_ticks "$BROKER_PID")
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  [ -n "$held_sampler" ] && { wait "$held_sampler" 2>/dev/null || true; }
  rss=$(cat "$WORK/peak" 2>/dev/null || rss_kb "$BROKER_PID")
  held=$(cat "$WORK/held" 2>/dev/null || echo 0)
  rm -f "$WORK/peak" "$WORK/held"
  stop_broker
  if [ -z "$json" ]; then
    echo "swarm failed for $broker $label:" >&2; tail -3 "$WORK/swarm.err" >&2; tail -3 "$WORK/broker.err" >&2 2>/dev/null || true
    json='{"received":0}'
  fi
  python3 - "$broker" "$threads" "$label" "$((t1 - t0))" "$rss" "$base" "$(getconf CLK_TCK)" "$json" "$held" >>"$WORK/rows" <<'EOF'
import json, sys
broker, threads, label, ticks, rss, base, hz, row, held = sys.argv[1:]
r = json.loads(row)
r.update(broker=broker, threads=int(threads), label=label, cpu_s=int(ticks) / int(hz), rss_kb=int(rss),
         base_kb=int(base), held_kb=int(held or 0))
print(json.dumps(r))
EOF
}

SCENARIOS=(
  "qos0 fan-in 8->1|--scenario fan-in --qos 0 --connections 8"
  "qos0 fan-out 1->16|--scenario fan-out --qos 0 --subscribers 16"
  "qos1 32 pairs|--scenario pairs --qos 1 --connections 32"
  "qos2 32 pairs|--scenario pairs --qos 2 --connections 32"
  "qos1 16 pairs x 2000/s|--scenario pairs --qos 1 --connections 16 --rate 2000"
  "qos1 shared 8->4|--scenario shared --qos 1 --connections 8 --subscribers 4"
  "qos0 fan-in 8x20000/s->1|--scenario fan-in --qos 0 --connections 8 --rate 20000"
  "10000 idle connections|--scenario storm --connections 10000"
)
# Same shape as SCENARIOS; every connection goes through TLS.
TLS_SCENARIOS=(
  "qos0 16 pairs over TLS|--scenario pairs --qos 0 --connections 16"
)
touch "$WORK/rows"
for entry in "${SCENARIOS[@]}"; do
  label=${entry%%|*}; args=${entry#*|}
  selected "$label" || continue
  for broker in coremq mosquitto; do
    echo "== $label on $broker" >&2
    # shellcheck disable=SC2086
    run_one "$broker" 1 0 "$label" $args
  done
done
for entry in "${TLS_SCENARIOS[@]}"; do
  label=${entry%%|*}; args=${entry#*|}
  selected "$label" || continue
  make_certs
  for broker in coremq mosquitto; do
    echo "== $label on $broker" >&2
    # shellcheck disable=SC2086
    run_one "$broker" 1 1 "$label" $args
  done
done
label="qos0 fan-in 8->1 (2 threads)"
if selected "$label"; then
  echo "== qos0 fan-in 8->1 on coremq, 2 threads" >&2
  run_one coremq 2 0 "$label" --scenario fan-in --qos 0 --connections 8
fi

python3 - "$WORK/rows" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def us_per_msg(r):
    n = r.get("received", 0)
    return r["cpu_s"] * 1e6 / n if n else float("nan")
def rate(r):
    return r.get("recv_rate", 0.0)
def per_conn(r, key):
    # Bytes of RSS above the broker's RSS before the run, per connection that connected.
    if not r.get(key):
        return float("nan")
    return (r[key] - r["base_kb"]) * 1024 / max(r.get("connects", 0), 1)
hdr = (f'{"scenario":<28} {"broker":<14} {"msgs/s":>10} {"p50 us":>8} {"p99 us":>8} {"p99.9 us":>9} '
       f'{"CPU us/msg":>10} {"RSS MiB":>8} {"lost":>8}')
print(hdr); print("-" * len(hdr))
by = {}
for r in rows:
    by.setdefault(r["label"], {})[(r["broker"], r["threads"])] = r
for label, d in by.items():
    for (broker, threads), r in d.items():
        name = broker if threads == 1 else f"{broker} x{threads}"
        if r.get("scenario") == "storm":
            print(f'{label:<28} {name:<14} {r.get("connect_rate",0):>10.0f} connects/s; RSS per idle connection '
                  f'{per_conn(r, "held_kb"):.0f} B held, {per_conn(r, "rss_kb"):.0f} B at peak '
                  f'({r["rss_kb"]/1024:.1f} MiB peak)')
            continue
        print(f'{label:<28} {name:<14} {rate(r):>10.0f} {r.get("lat_p50_us",0):>8} {r.get("lat_p99_us",0):>8} '
              f'{r.get("lat_p999_us",0):>9} {us_per_msg(r):>10.2f} {r["rss_kb"]/1024:>8.1f} {r.get("lost",0):>8}')
    c, m = d.get(("coremq", 1)), d.get(("mosquitto", 1))
    if c and m and c.get("scenario") == "storm":
        def ratio_of(key):
            pm = per_conn(m, key)
            return per_conn(c, key) / pm if pm > 0 else float("nan")
        print(f'{"":<28} {"ratio c/m":<14} RSS per idle connection {ratio_of("held_kb"):.2f} held, '
              f'{ratio_of("rss_kb"):.2f} at peak')
    elif c and m:
        def ratio(a, b):
            return a / b if b else float("nan")
        print(f'{"":<28} {"ratio c/m":<14} {ratio(rate(c), rate(m)):>10.2f} '
              f'{ratio(c.get("lat_p50_us",0), m.get("lat_p50_us",0)):>8.2f} {ratio(c.get("lat_p99_us",0), m.get("lat_p99_us",0)):>8.2f} '
              f'{ratio(c.get("lat_p999_us",0), m.get("lat_p999_us",0)):>9.2f} {ratio(us_per_msg(c), us_per_msg(m)):>10.3f} '
              f'{ratio(c["rss_kb"], m["rss_kb"]):>8.2f}')
EOF
