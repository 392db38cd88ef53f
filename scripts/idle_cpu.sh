#!/usr/bin/env bash
# CPU an idle broker spends holding many idle connections (issue 16, item 3): the cost of the broker's
# timers (keep-alive, connect timeout, ...) when nothing else happens, e.g. an every-250-ms sweep over
# all connections against a deadline structure that sleeps until the next deadline.
#
#   scripts/idle_cpu.sh [--conns N] [--seconds S] [--threads T] [BINARY]
#
# Defaults: N=10000, S=30, T=2, BINARY=target/release/coremq (not built by this script).
#
# It starts BINARY on a free loopback port (`--listen 127.0.0.1:PORT --threads T`, open files limit
# raised towards 65536), opens N MQTT 3.1.1 connections with scripts/idle_conns.py (CONNECT with clean
# session, keep-alive 60 s, distinct client ids; every CONNACK must carry return code 0; at most 256
# handshakes in flight; the connect phase is bounded by 120 s), and then sends nothing. After 5 s of
# settling it reads the broker process's utime+stime from /proc/PID/stat, sleeps S seconds and reads them
# again; finally it checks that the broker kept every connection open (none closed, nothing sent), stops
# the clients and the broker and prints one line on stdout:
#
#   idle_cpu: conns=10000 threads=2 seconds=30 cpu_ms=120 cpu_pct=0.40 rss_kib=51234 sched_cpu_ms=118.734 ctx_switches=241
#
# cpu_ms:       broker CPU time (all threads, user + system) over the window, from /proc/PID/stat
#               (resolution 1 clock tick, usually 10 ms);
# cpu_pct:      cpu_ms as a percentage of one core over the measured wall time;
# rss_kib:      broker VmRSS at the end of the window;
# sched_cpu_ms: the same CPU time summed from /proc/PID/task/*/schedstat (ns resolution; useful when
#               cpu_ms is only a few ticks);
# ctx_switches: voluntary + involuntary context switches of the broker's threads in the window, i.e.
#               roughly how often its threads woke up (a 250 ms sweep is ~4/s per thread).
# Progress and diagnostics go to stderr. Exit status is non-zero on any failure.
#
# Compare two binaries (e.g. before and after the timer change) by running each on the same machine,
# one after the other, with the same arguments, and comparing cpu_ms / sched_cpu_ms and ctx_switches:
#
#   git worktree add /tmp/before <base-commit> && (cd /tmp/before && cargo build --release)
#   cargo build --release
#   for b in /tmp/before/target/release/coremq target/release/coremq; do scripts/idle_cpu.sh "$b"; done
#
# Only the broker process's own CPU time is measured, so other load on the machine matters little (it
# can still delay wake-ups slightly); repeat a run or two if the numbers are close. S must stay well
# under the 90 s (1.5 x keep-alive) after which a broker may close a silent client; at most 70 s.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=10000
SECS=30
THREADS=2
BINARY=target/release/coremq
CONNECT_TIMEOUT=120
SETTLE=5
KEEPALIVE=60
usage() { echo "usage: $0 [--conns N] [--seconds S] [--threads T] [BINARY]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) [ $# -ge 2 ] || usage; CONNS="$2"; shift 2 ;;
    --seconds) [ $# -ge 2 ] || usage; SECS="$2"; shift 2 ;;
    --threads) [ $# -ge 2 ] || usage; THREADS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    -*) usage ;;
    *) BINARY="$1"; shift ;;
  esac
done

fail() { echo "idle_cpu: FAIL: $*" >&2; exit 1; }
for v in CONNS SECS THREADS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || fail "$v must be a positive integer (got '${!v}')"
done
[ "$SECS" -le 70 ] || fail "--seconds $SECS: at most 70 (the clients' keep-alive is $KEEPALIVE s and they stay silent)"
[ -x "$BINARY" ] || fail "no executable broker at $BINARY (build it, or pass the binary's path)"
BINARY=$(realpath "$BINARY")
command -v python3 >/dev/null || fail "python3 not found"
CLK_TCK=$(getconf CLK_TCK)

# Open files: the clients and the broker each need one descriptor per connection. Raise this shell's
# limit (inherited by both) towards 65536, as far as the hard limit allows.
WANT=65536
HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt "$WANT" ]; then WANT=$HARD; fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$WANT" ]; then
  ulimit -n "$WANT" || fail "cannot raise the open files limit to $WANT"
fi
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ $((CONNS + 128)) -gt "$NOFILE" ]; then
  fail "--conns $CONNS needs an open files limit of at least $((CONNS + 128)); the hard limit allows $NOFILE"
fi

WORK=$(mktemp -d)
BROKER_PID=""
CLIENT_PID=""
NAP_PID=""

# alive PID: the process exists and is not a zombie.
alive() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}
# wait_gone PID SECS: waits up to SECS for PID to exit; returns 1 if it is still there.
wait_gone() {
  local end=$((SECONDS + $2))
  while alive "$1"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}
# stop PID NAME SECS: SIGTERM, up to SECS to exit, then SIGKILL; returns 1 if it had to be killed.
stop() {
  kill -TERM "$1" 2>/dev/null || true
  if ! wait_gone "$1" "$3"; then
    echo "idle_cpu: $2 (pid $1) did not exit within $3 s of SIGTERM; killing it" >&2
    kill -KILL "$1" 2>/dev/null || true
    wait_gone "$1" 5 || true
    return 1
  fi
}
cleanup() {
  set +e
  [ -n "$NAP_PID" ] && kill "$NAP_PID" 2>/dev/null
  [ -n "$CLIENT_PID" ] && stop "$CLIENT_PID" clients 20
  [ -n "$BROKER_PID" ] && stop "$BROKER_PID" broker 15
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
broker_log() { echo "--- broker log (last 20 lines):" >&2; tail -n 20 "$WORK/broker.log" >&2 || true; }
check_broker() { alive "$BROKER_PID" || { broker_log; fail "the broker exited ($1)"; }; }

# CPU ticks (utime + stime, all threads) of PID; fields 14 and 15 of /proc/PID/stat, counted after the
# ")" that ends the command name.
cpu_ticks() {
  local s
  s=$(cat "/proc/$1/stat") || return 1
  s=${s##*) }
  set -- $s
  echo $(( ${12} + ${13} ))
}
# Nanoseconds on cpu summed over PID's threads, and their context switches.
sched_ns() { { cat /proc/"$1"/task/*/schedstat 2>/dev/null || true; } | awk '{ s += $1 } END { printf "%d\n", s }'; }
ctx_switches() {
  { cat /proc/"$1"/task/*/status 2>/dev/null || true; } | awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}
now_ns() { date +%s%N; }
# A sleep that a signal interrupts at once (bash runs traps only after a foreground command ends).
nap() { sleep "$1" & NAP_PID=$!; wait "$NAP_PID"; NAP_PID=""; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== $BINARY on 127.0.0.1:$PORT, $THREADS threads, open files limit $NOFILE" >&2
"$BINARY" --listen "127.0.0.1:$PORT" --threads "$THREADS" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!

end=$((SECONDS + 15))
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
  check_broker "during startup"
  [ "$SECONDS" -lt "$end" ] || { broker_log; fail "the broker did not accept connections within 15 s"; }
  sleep 0.1
done

echo "== opening $CONNS idle connections" >&2
: >"$WORK/client.out"
python3 scripts/idle_conns.py --port "$PORT" --conns "$CONNS" --keepalive "$KEEPALIVE" \
  --timeout "$CONNECT_TIMEOUT" --prefix "idle-cpu-$$" >"$WORK/client.out" &
CLIENT_PID=$!
end=$((SECONDS + CONNECT_TIMEOUT + 15))
until grep -q '^ready ' "$WORK/client.out"; do
  if ! alive "$CLIENT_PID"; then
    rc=0; wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    fail "the client program exited with status $rc before all $CONNS connections were up"
  fi
  check_broker "while the clients connected"
  [ "$SECONDS" -lt "$end" ] || fail "the clients were not connected within $((CONNECT_TIMEOUT + 15)) s"
  sleep 0.2
done
READY=$(grep '^ready ' "$WORK/client.out")
CONNECT_S=$(sed -n 's/.*connect_s=\([0-9.]*\).*/\1/p' <<<"$READY")
[ "$(sed -n 's/.*conns=\([0-9]*\).*/\1/p' <<<"$READY")" = "$CONNS" ] || fail "client reported: $READY"
if awk -v c="$CONNECT_S" -v s="$((SETTLE + SECS))" -v k="$KEEPALIVE" 'BEGIN { exit !(c + s > 1.5 * k - 5) }'; then
  fail "connecting took ${CONNECT_S} s: with ${SETTLE} s settling and ${SECS} s measured, the first clients would reach 1.5 x keep-alive; use fewer --seconds"
fi

echo "== $CONNS connections up in ${CONNECT_S} s; settling ${SETTLE} s, then measuring ${SECS} s" >&2
nap "$SETTLE"
check_broker "while settling"
T0=$(now_ns); TICKS0=$(cpu_ticks "$BROKER_PID"); NS0=$(sched_ns "$BROKER_PID"); CTX0=$(ctx_switches "$BROKER_PID")
nap "$SECS"
T1=$(now_ns); TICKS1=$(cpu_ticks "$BROKER_PID"); NS1=$(sched_ns "$BROKER_PID"); CTX1=$(ctx_switches "$BROKER_PID")
check_broker "during the measurement"
RSS_KIB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$BROKER_PID/status")

# The measurement only counts if the broker held every connection for the whole window.
alive "$CLIENT_PID" || fail "the client program exited during the measurement"
C=$CLIENT_PID
CLIENT_PID=""
stop "$C" clients 20 || fail "the client program did not stop"
rc=0; wait "$C" || rc=$?
[ "$rc" -eq 0 ] || fail "the client program exited with status $rc (see above): the broker did not leave all $CONNS connections idle and open"

B=$BROKER_PID
BROKER_PID=""
stop "$B" broker 15 || { broker_log; fail "the broker did not shut down within 15 s of SIGTERM"; }
rc=0; wait "$B" || rc=$?
[ "$rc" -eq 0 ] || { broker_log; fail "the broker exited with status $rc on SIGTERM"; }

awk -v conns="$CONNS" -v threads="$THREADS" -v secs="$SECS" -v ticks=$((TICKS1 - TICKS0)) -v hz="$CLK_TCK" \
  -v wall_ns=$((T1 - T0)) -v rss="$RSS_KIB" -v ns=$((NS1 - NS0)) -v ctx=$((CTX1 - CTX0)) 'BEGIN {
    cpu_ms = ticks * 1000 / hz
    printf "idle_cpu: conns=%d threads=%d seconds=%d cpu_ms=%d cpu_pct=%.2f rss_kib=%d sched_cpu_ms=%.3f ctx_switches=%d\n",
      conns, threads, secs, cpu_ms, cpu_ms * 1e8 / wall_ns, rss, ns / 1e6, ctx
  }'
