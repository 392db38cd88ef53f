#!/usr/bin/env bash
# Loss check with the publisher swarm: every swarm scenario that has subscribers (fan-in, fan-out,
# pairs, shared, iot) at QoS 1 and 2, over MQTT 3.1.1 and 5, against a broker with --threads 1 and 2:
# 40 runs of --duration 2, each against a fresh broker on a free loopback port (so that one run's
# congestion or leftover sessions cannot hide or cause another's loss).
#
# A run fails when the swarm reports a lost message (or exits non-zero: duplicates at QoS 2, failed
# connections, an unreachable broker), or when the broker's shutdown report (SIGTERM) counts a dropped
# message. Prints one line per run; exits 1 naming the failed runs, 0 when all pass.
#
# Builds the release binaries first if target/release/coremq or coremq-swarm is missing.
# Environment: SWARM_CHECK_DURATION (default 2) and SWARM_CHECK_WARMUP (default 1) seconds per run;
# SWARM_CHECK_SCENARIOS (default "fan-in fan-out pairs shared iot"); SWARM_CHECK_BROKER_ARGS, extra
# broker flags (e.g. "--slow-subscriber drop --max-queued-messages 10" shows the check failing).
set -uo pipefail
cd "$(dirname "$0")/.."

broker_bin=target/release/coremq
swarm_bin=target/release/coremq-swarm
duration=${SWARM_CHECK_DURATION:-2}
warmup=${SWARM_CHECK_WARMUP:-1}
scenarios=${SWARM_CHECK_SCENARIOS:-fan-in fan-out pairs shared iot}
read -r -a broker_args <<<"${SWARM_CHECK_BROKER_ARGS:-}"

if [ ! -x "$broker_bin" ] || [ ! -x "$swarm_bin" ]; then
  echo "== building release binaries"
  cargo build --release --workspace || exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/swarm_check.XXXXXX") || exit 2
broker_pid=""
cleanup() {
  # Only the broker this script started, by its pid.
  if [ -n "$broker_pid" ]; then kill -KILL "$broker_pid" 2>/dev/null; wait "$broker_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port that was free a moment ago (bound to port 0 and released). The broker may still lose it to
# someone else; start_broker then tries another.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a broker with $1 threads on a fresh port; sets broker_pid and port. Ready means every core
# listens: coremq prints "listening on" once all of them have bound the port.
start_broker() {
  local threads=$1 _ i
  for _ in 1 2 3; do
    port=$(free_port) || return 1
    : >"$work/broker.out"
    "$broker_bin" --listen "127.0.0.1:$port" --threads "$threads" ${broker_args[@]+"${broker_args[@]}"} \
      >"$work/broker.out" 2>"$work/broker.err" &
    broker_pid=$!
    for i in $(seq 100); do
      if grep -q "listening on" "$work/broker.err" 2>/dev/null; then return 0; fi
      if ! kill -0 "$broker_pid" 2>/dev/null; then break; fi
      sleep 0.05
    done
    kill -KILL "$broker_pid" 2>/dev/null
    wait "$broker_pid" 2>/dev/null
    broker_pid=""
    grep -q "in use" "$work/broker.err" || break
  done
  echo "broker did not start (--threads $threads):" >&2
  cat "$work/broker.err" >&2
  return 1
}

# SIGTERM, then up to 10 s for the shutdown report; SIGKILL after that (the report is then missing,
# which fails the run).
stop_broker() {
  local i
  kill -TERM "$broker_pid" 2>/dev/null
  for i in $(seq 200); do
    kill -0 "$broker_pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$broker_pid" 2>/dev/null
  wait "$broker_pid" 2>/dev/null
  broker_pid=""
}

# Joins the arguments with ", ".
join() {
  local out="$1"
  shift
  for x in "$@"; do out="$out, $x"; done
  printf '%s' "$out"
}

# Value of "key":N in the swarm's JSON line.
json_num() {
  grep -o "\"$1\":[0-9]*" <<<"$2" | head -n1 | cut -d: -f2
}

failed=()
runs=0
start=$SECONDS
for threads in 1 2; do
  for mqtt in 3.1.1 5; do
    for qos in 1 2; do
      for scenario in $scenarios; do
        runs=$((runs + 1))
        name="threads=$threads mqtt=$mqtt qos=$qos $scenario"
        if ! start_broker "$threads"; then
          failed+=("$name (broker did not start)")
          printf '%-40s FAIL broker did not start\n' "$name"
          continue
        fi
        # The swarm's own bound is its duration plus warmup and a drain; 60 s covers a loaded machine.
        out=$(timeout 60 "$swarm_bin" --port "$port" --scenario "$scenario" --qos "$qos" --mqtt "$mqtt" \
          --duration "$duration" --warmup "$warmup" --json 2>"$work/swarm.err")
        status=$?
        stop_broker
        json=$(grep '^{' <<<"$out" | tail -n1)
        sent=$(json_num sent "$json")
        received=$(json_num received "$json")
        lost=$(json_num lost "$json")
        dup=$(json_num duplicated "$json")
        all=$(grep '^all:' "$work/broker.out" | tail -n1)
        dropped=$(sed -n 's/.*dropped \([0-9]*\).*/\1/p' <<<"$all")
        held=$(sed -n 's/.*held \([0-9]*\).*/\1/p' <<<"$all")
        why=()
        [ "$status" -eq 0 ] || why+=("swarm exit $status")
        [ -n "$json" ] || why+=("no JSON line from the swarm")
        [ "${lost:-0}" = 0 ] || why+=("lost $lost")
        [ -n "$all" ] || why+=("no shutdown report from the broker")
        [ "${dropped:-0}" = 0 ] || why+=("dropped $dropped")
        verdict=ok
        if [ ${#why[@]} -gt 0 ]; then
          verdict="FAIL: $(join "${why[@]}")"
          failed+=("$name ($(join "${why[@]}"))")
        fi
        printf '%-40s sent %9s  received %9s  lost %s  duplicated %s  broker dropped %s held %s  %s\n' \
          "$name" "${sent:-?}" "${received:-?}" "${lost:-?}" "${dup:-?}" "${dropped:-?}" "${held:-?}" "$verdict"
        if [ ${#why[@]} -gt 0 ]; then
          # The swarm's own complaints, without its per-second progress lines.
          grep -v -E '^coremq-swarm: +[0-9.]+s ' "$work/swarm.err" | head -n 5 | sed 's/^/    swarm: /'
        fi
      done
    done
  done
done

echo "swarm_check: $runs runs in $((SECONDS - start)) s, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  for f in "${failed[@]}"; do echo "FAILED: $f"; done
  exit 1
fi
exit 0
