#!/usr/bin/env bash
# Side-by-side benchmark: raftmq vs Mosquitto on loopback, the broker pinned to CPU 0 and
# the load generator (raftmq-bench) to CPU 1, the same scenarios for both, three
# repetitions, medians written into docs/benchmarks.md.
#
#   bash tests/bench/compare.sh            # about 15 minutes on a 2-core machine
#   REPS=1 DURATION=3 bash tests/bench/compare.sh   # a quick look
#   CLUSTER=0 bash tests/bench/compare.sh  # without the cluster rows (tests/bench/cluster.sh)
#
# Needs: the Rust toolchain, mosquitto (Debian package; installed if missing and root),
# taskset, python3. Traffic stays on 127.0.0.1; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/../.."

REPS="${REPS:-3}"
DURATION="${DURATION:-5}"
CLIENTS="${CLIENTS:-10000}"
OUT="${OUT:-docs/benchmarks.md}"
RAW="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RAW"' EXIT

if ! command -v mosquitto >/dev/null 2>&1 && [ -x /usr/sbin/mosquitto ]; then PATH="$PATH:/usr/sbin"; fi
if ! command -v mosquitto >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    PATH="$PATH:/usr/sbin"
  else
    echo "mosquitto is required (apt install mosquitto)" >&2
    exit 1
  fi
fi
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p raftmq-node -p raftmq-tests --bin raftmq --bin raftmq-bench
RAFTMQ=target/release/raftmq
BENCH=target/release/raftmq-bench
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PORT=29883

broker_cmd() {
  case "$1" in
    raftmq) echo "env RAFTMQ_LISTENERS=[] RAFTMQ_ADMIN__ENABLED=false RAFTMQ_SYS__INTERVAL_SECS=0 RAFTMQ_MQTT__MAX_CONNECTION_RATE=0 RUST_LOG=error $RAFTMQ --mqtt-listen 127.0.0.1:$PORT" ;;
    mosquitto)
      printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_type none\n' "$PORT" > "$RAW/mosquitto.conf"
      echo "mosquitto -c $RAW/mosquitto.conf" ;;
  esac
}

start_broker() {
  # shellcheck disable=SC2046
  taskset -c 0 $(broker_cmd "$1") >/dev/null 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.05; done
  echo "$1 did not start" >&2; exit 1
}

stop_broker() { kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; }

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

bench() { taskset -c 1 "$BENCH" --broker "127.0.0.1:$PORT" --json "$@" 2>/dev/null; }

run_scenarios() {
  local b="$1" rep="$2"
  start_broker "$b"
  bench --duration "$DURATION" p2p -c 16 > "$RAW/$b.p2p_q0.$rep"
  bench --duration "$DURATION" --qos 1 p2p -c 16 > "$RAW/$b.p2p_q1.$rep"
  bench --duration "$DURATION" fanout -c 100 > "$RAW/$b.fanout_q0.$rep"
  bench --duration "$DURATION" --qos 1 fanout -c 100 > "$RAW/$b.fanout_q1.$rep"
  bench --duration "$DURATION" latency --busy-poll > "$RAW/$b.latency.$rep"
  bench conn -c 5000 > "$RAW/$b.conn.$rep"
  stop_broker
  # Memory: idle connections, one subscription each, and subscriptions alone (200 clients
  # with 1,000 distinct filters each; bytes per subscription).
  for sub in idle sub filters; do
    start_broker "$b"
    sleep 0.5
    local before; before=$(rss_kb "$BROKER_PID")
    local args=(-c "$CLIENTS") per="$CLIENTS"
    [ "$sub" = sub ] && args+=(--subscribe)
    [ "$sub" = filters ] && args=(-c 200 --concurrency 50 --filters 1000) && per=200000
    taskset -c 1 "$BENCH" --broker "127.0.0.1:$PORT" conn "${args[@]}" --hold 4 2> "$RAW/hold.log" >/dev/null &
    local gen=$!
    for _ in $(seq 1200); do grep -q connected "$RAW/hold.log" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    local after; after=$(rss_kb "$BROKER_PID")
    echo "{\"bytes_per_conn\": $(( (after - before) * 1024 / per ))}" > "$RAW/$b.mem_$sub.$rep"
    wait "$gen" || true
    stop_broker
  done
}

for rep in $(seq "$REPS"); do
  taskset -c 0 python3 tests/bench/echo_floor.py server $((PORT + 1)) &
  ECHO_PID=$!
  sleep 0.3
  taskset -c 1 python3 tests/bench/echo_floor.py client $((PORT + 1)) > "$RAW/floor.floor.$rep"
  wait "$ECHO_PID" || true
  for b in raftmq mosquitto; do
    echo "repetition $rep: $b" >&2
    run_scenarios "$b" "$rep"
  done
done

MOSQ_VERSION="$(mosquitto -h 2>/dev/null | head -1 || true)"
RAFTMQ_VERSION="$($RAFTMQ --version)"
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
python3 - "$RAW" "$OUT" "$REPS" "$DURATION" "$CLIENTS" "$MOSQ_VERSION" "$RAFTMQ_VERSION" "$CPU" <<'PY'
import json, os, statistics, sys, datetime
raw, out, reps, duration, clients, mosq, raftmq, cpu = sys.argv[1:9]
def med(broker, name, key, sub=None):
    vals = []
    for rep in range(1, int(reps) + 1):
        path = os.path.join(raw, f"{broker}.{name}.{rep}")
        try:
            d = json.loads(open(path).read().strip().splitlines()[-1])
        except Exception:
            continue
        v = d.get(key) if sub is None else (d.get(key) or {}).get(sub)
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None
def fmt(v, unit=""):
    if v is None: return "n/a"
    if unit == "msg": return f"{v/1000:.1f}k" if v < 1e6 else f"{v/1e6:.2f}M"
    if unit == "B": return f"{v:,.0f} B"
    return f"{v:,.0f}"
rows = [
  ("p2p 16 -> 16, QoS 0 (msg/s delivered)", "p2p_q0", "msgs_per_sec", None, "msg", ">= 500k"),
  ("p2p 16 -> 16, QoS 1", "p2p_q1", "msgs_per_sec", None, "msg", ">= 400k"),
  ("fan-out 1 -> 100, QoS 0 (deliveries/s)", "fanout_q0", "msgs_per_sec", None, "msg", ">= 2.5M"),
  ("fan-out 1 -> 100, QoS 1", "fanout_q1", "msgs_per_sec", None, "msg", ">= 1.5M"),
  ("latency p50 at 1,000 msg/s (us)", "latency", "latency_us", "p50", "", "<= 35"),
  ("latency p99 at 1,000 msg/s (us)", "latency", "latency_us", "p99", "", "<= 60"),
  ("new connections/s (5,000 clients)", "conn", "conn_per_sec", None, "", ">= 10k"),
  (f"idle memory per connection ({int(clients):,} clients)", "mem_idle", "bytes_per_conn", None, "B", "<= 2 KB"),
  ("... with one subscription each", "mem_sub", "bytes_per_conn", None, "B", "<= 4 KB"),
  ("memory per subscription (200 clients x 1,000 filters)", "mem_filters", "bytes_per_conn", None, "B", "<= 500 B"),
]
table = ["| test | raftmq | Mosquitto | target |", "| --- | --- | --- | --- |"]
for label, name, key, sub, unit, target in rows:
    table.append(f"| {label} | {fmt(med('raftmq', name, key, sub), unit)} | {fmt(med('mosquitto', name, key, sub), unit)} | {target} |")
floor = (med('floor', 'floor', 'rtt_us', 'p50'), med('floor', 'floor', 'rtt_us', 'p99'))
table += ["", f"Floor of this machine (no broker: loopback round trip into a core idle for 1 ms, `tests/bench/echo_floor.py`): p50 {fmt(floor[0])} us, p99 {fmt(floor[1])} us."]
block = "\n".join([
  "<!-- results:begin (written by tests/bench/compare.sh) -->",
  f"Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {cpu}, {os.cpu_count()} CPUs; broker pinned to CPU 0,",
  f"raftmq-bench to CPU 1; 64-byte payloads; median of {reps} runs of {duration} s; {raftmq}; {mosq}.",
  "",
  *table,
  "<!-- results:end -->",
])
text = open(out).read() if os.path.exists(out) else ""
begin, end = "<!-- results:begin", "<!-- results:end -->"
if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
else:
    text = text + "\n" + block + "\n"
open(out, "w").write(text)
print(block)
PY

# The cluster rows: three nodes against one on the same core (same repetitions).
if [ "${CLUSTER:-1}" != 0 ]; then
  SKIP_BUILD=1 REPS="$REPS" DURATION="$DURATION" OUT="$OUT" bash tests/bench/cluster.sh
fi
