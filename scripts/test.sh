#!/usr/bin/env bash
# Installs the test dependencies a fresh Debian machine lacks (mosquitto-clients, mosquitto for the
# reference runs, paho-mqtt, pytest, cargo-fuzz), then runs every check: format, lints, unit and
# property tests, integration tests against the real broker binary on both backends, a short fuzzing
# run of each cargo-fuzz target, the swarm loss check (scripts/swarm_check.sh) and the paho-mqtt tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# cryptography: the TLS test generates its certificates with it.
if ! python3 -c 'import paho.mqtt, pytest, cryptography' >/dev/null 2>&1; then
  echo "== installing paho-mqtt, pytest and cryptography"
  python3 -m pip install -q 'paho-mqtt>=2,<3' pytest cryptography
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== cargo test (unit, property and integration tests)"
cargo test --workspace --release
echo "== fuzzing: decoder and connection state machine, 20 s each (scripts/fuzz.sh 3600 for a long run)"
bash scripts/fuzz.sh 20

echo "== swarm loss check: every scenario with subscribers at QoS 1 and 2, MQTT 3.1.1 and 5, 1 and 2 threads"
# A lost or dropped acknowledged message fails the run (a loss is a bug, not a figure).
cargo build --release --workspace
bash scripts/swarm_check.sh

for backend in uring epoll; do
  echo "== paho-mqtt tests ($backend backend)"
  COREMQ_BIN="$PWD/target/release/coremq" COREMQ_BACKEND=$backend python3 -m pytest -q tests/python
done
