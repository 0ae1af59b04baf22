#!/usr/bin/env bash
# Cluster benchmark: three raftmq nodes on one machine against one node, the same scenarios
# through raftmq-bench, results into docs/benchmarks.md (between the cluster markers).
#
#   bash tests/bench/cluster.sh                     # about 4 minutes on a 2-core machine
#   REPS=1 DURATION=3 bash tests/bench/cluster.sh   # a quick look
#
# Pinning: every broker process on CPU 0 (the three nodes share the one core a single node
# gets, so the rows compare the same broker CPU), raftmq-bench on CPU 1. Traffic stays on
# 127.0.0.1; every run is bounded in time; every process started here is killed by pid.
set -euo pipefail
cd "$(dirname "$0")/../.."

REPS="${REPS:-3}"
DURATION="${DURATION:-5}"
OUT="${OUT:-docs/benchmarks.md}"
RAW="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$RAW"; }
trap cleanup EXIT

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p raftmq-node -p raftmq-tests --bin raftmq --bin raftmq-bench
RAFTMQ=target/release/raftmq
BENCH=target/release/raftmq-bench
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
BASE=29900   # MQTT 29900+i, admin 29910+i, cluster 29920+i

wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

start_node() { # index, seeds ("" for a single node)
  local i="$1" seeds="$2" args=()
  [ -n "$seeds" ] && args=(--cluster-listen "127.0.0.1:$((BASE + 20 + i))" --seeds "$seeds")
  env RAFTMQ_LISTENERS=[] RAFTMQ_SYS__INTERVAL_SECS=0 RAFTMQ_MQTT__MAX_CONNECTION_RATE=0 RAFTMQ_CLUSTER__SECRET=bench RUST_LOG=error \
    taskset -c 0 timeout 900 "$RAFTMQ" --node-name "n$i" --mqtt-listen "127.0.0.1:$((BASE + i))" \
    --admin-listen "127.0.0.1:$((BASE + 10 + i))" --data-dir "$RAW/data${seeds:+-cluster}$i" "${args[@]}" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port $((BASE + i))
}

stop_all() { # and forget their data: every run starts empty
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); rm -rf "$RAW"/data*
}

wait_ready() { # every node's /readyz
  for i in 0 1 2; do
    for _ in $(seq 200); do
      curl -sf "http://127.0.0.1:$((BASE + 10 + i))/readyz" >/dev/null 2>&1 && break
      python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$((BASE + 10 + i))/readyz')" 2>/dev/null && break
      sleep 0.1
    done
  done
}

bench() { # the summary on stdout; on failure, what the generator said
  taskset -c 1 "$BENCH" --json "$@" 2>"$RAW/bench.err" || { echo "raftmq-bench $* failed:" >&2; grep -v "^ \{2,\}" "$RAW/bench.err" | tail -5 >&2; return 1; }
}
N0="127.0.0.1:$BASE"; N1="127.0.0.1:$((BASE + 1))"; N2="127.0.0.1:$((BASE + 2))"

for rep in $(seq "$REPS"); do
  echo "repetition $rep: one node" >&2
  start_node 0 ""
  bench --broker "$N0" --duration "$DURATION" p2p -c 16 > "$RAW/single.p2p_q0.$rep"
  bench --broker "$N0" --duration "$DURATION" --qos 1 p2p -c 16 > "$RAW/single.p2p_q1.$rep"
  bench --broker "$N0" --duration "$DURATION" --qos 1 --mqtt 5 --persistent p2p -c 16 > "$RAW/single.p2p_q1_durable.$rep"
  bench --broker "$N0" --duration "$DURATION" fanout -c 99 > "$RAW/single.fanout_q0.$rep"
  bench --broker "$N0" --duration "$DURATION" fanin -c 16 --members 6 > "$RAW/single.fanin_q0.$rep"
  bench --broker "$N0" conn -c 5000 > "$RAW/single.conn.$rep"
  bench --broker "$N0" routes -c 2000 --clients 4 > "$RAW/single.routes.$rep"
  stop_all

  echo "repetition $rep: three nodes" >&2
  SEEDS="127.0.0.1:$((BASE + 20)),127.0.0.1:$((BASE + 21)),127.0.0.1:$((BASE + 22))"
  for i in 0 1 2; do start_node "$i" "$SEEDS"; done
  wait_ready
  bench --broker "$N0" --sub-brokers "$N1" --duration "$DURATION" p2p -c 16 > "$RAW/cluster.p2p_q0.$rep"
  bench --broker "$N0" --sub-brokers "$N1" --duration "$DURATION" --qos 1 p2p -c 16 > "$RAW/cluster.p2p_q1.$rep"
  bench --broker "$N0" --sub-brokers "$N1" --duration "$DURATION" --qos 1 --mqtt 5 --persistent p2p -c 16 > "$RAW/cluster.p2p_q1_durable.$rep"
  bench --broker "$N0" --sub-brokers "$N0,$N1,$N2" --duration "$DURATION" fanout -c 99 > "$RAW/cluster.fanout_q0.$rep"
  bench --broker "$N0" --sub-brokers "$N0,$N1,$N2" --duration "$DURATION" fanin -c 16 --members 6 > "$RAW/cluster.fanin_q0.$rep"
  bench --broker "$N0" --sub-brokers "$N1,$N2" routes -c 2000 --clients 4 > "$RAW/cluster.routes.$rep"
  bench --broker "$N1" conn -c 5000 --subscribe > /dev/null
  curl -s "http://127.0.0.1:$((BASE + 11))/metrics" 2>/dev/null > "$RAW/settle.$rep" \
    || python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$((BASE + 11))/metrics').read().decode())" > "$RAW/settle.$rep"
  bench --broker "$N2" conn -c 5000 > "$RAW/cluster.conn.$rep"
  stop_all
done

RAFTMQ_VERSION="$($RAFTMQ --version)"
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
python3 - "$RAW" "$OUT" "$REPS" "$DURATION" "$RAFTMQ_VERSION" "$CPU" <<'PY'
import json, os, statistics, sys, datetime, re
raw, out, reps, duration, raftmq, cpu = sys.argv[1:7]
def med(setup, name, key):
    vals = []
    for rep in range(1, int(reps) + 1):
        try:
            d = json.loads(open(os.path.join(raw, f"{setup}.{name}.{rep}")).read().strip().splitlines()[-1])
        except Exception:
            continue
        if d.get(key) is not None:
            vals.append(d[key])
    return statistics.median(vals) if vals else None
def settle_p99():
    # The SUBACK's wait for the peers, from the histogram of the subscribers' node.
    worst = []
    for rep in range(1, int(reps) + 1):
        try:
            text = open(os.path.join(raw, f"settle.{rep}")).read()
        except Exception:
            continue
        buckets = [(float("inf") if le == "+Inf" else float(le), float(n)) for le, n in
                   re.findall(r'raftmq_cluster_route_settle_seconds_bucket\{le="([^"]+)"\} (\S+)', text)]
        if not buckets or buckets[-1][1] == 0:
            continue
        total = buckets[-1][1]
        worst.append(next(le for le, n in buckets if n >= 0.99 * total))
    return max(worst) if worst else None
def fmt(v, unit="msg"):
    if v is None: return "n/a"
    if unit == "msg": return f"{v/1000:.1f}k" if v < 1e6 else f"{v/1e6:.2f}M"
    return f"{v:,.0f}"
rows = []
for label, name, unit, target in [
    ("p2p 16 -> 16, QoS 0: publishers on n1, subscribers on n2", "p2p_q0", "msg", "cluster >= half of one node"),
    ("p2p 16 -> 16, QoS 1: publishers on n1, subscribers on n2", "p2p_q1", "msg", ""),
    ("p2p 16 -> 16, QoS 1, persistent subscribers (every delivery committed by Raft before the PUBACK)", "p2p_q1_durable", "msg", ">= 50k msg/s"),
    ("fan-out 1 -> 99, QoS 0: subscribers spread over n1..n3", "fanout_q0", "msg", ""),
    ("`$share` fan-in 16 -> group of 6, QoS 0: members spread over n1..n3", "fanin_q0", "msg", ""),
    ("new connections/s (5,000 clients; in a cluster each CONNECT asks the peers)", "conn", "n", "cluster >= 80 % of one node"),
]:
    key = "conn_per_sec" if name == "conn" else "msgs_per_sec"
    one, three = med("single", name, key), med("cluster", name, key)
    ratio = f"{three / one:.2f}" if one and three else "n/a"
    rows.append(f"| {label} | {fmt(one, unit)} | {fmt(three, unit)} | {ratio} | {target} |")
def routes(setup):
    # Worst p99 of SUBSCRIBE -> SUBACK over the runs, and whether every probe arrived.
    p99s, missed = [], 0
    for rep in range(1, int(reps) + 1):
        try:
            d = json.loads(open(os.path.join(raw, f"{setup}.routes.{rep}")).read().strip().splitlines()[-1])
        except Exception:
            continue
        p99s.append(d["latency_us"]["p99"])
        missed += d["sent"] - d["received"]
    return (max(p99s) / 1000 if p99s else None), missed
(one_p99, one_missed), (three_p99, three_missed) = routes("single"), routes("cluster")
ms = lambda v: "n/a" if v is None else f"{v:.2f} ms"
def ack_p99(setup):
    vals = []
    for rep in range(1, int(reps) + 1):
        try:
            d = json.loads(open(os.path.join(raw, f"{setup}.p2p_q1_durable.{rep}")).read().strip().splitlines()[-1])
        except Exception:
            continue
        if d.get("ack_latency_us", {}).get("p99") is not None:
            vals.append(d["ack_latency_us"]["p99"] / 1000)
    return statistics.median(vals) if vals else None
rows.append(f"| PUBACK p99 of the persistent QoS 1 row (PUBLISH to PUBACK at the publisher, window 64 per publisher) | {ms(ack_p99('single'))} | {ms(ack_p99('cluster'))} | | < 10 ms |")
rows.append(f"| route convergence p99: SUBSCRIBE to SUBACK, 4 clients subscribing one topic after another (2,000 routes), each probed by a publish from another node right after its SUBACK | {ms(one_p99)} | {ms(three_p99)} | probes lost: {one_missed} / {three_missed} | cluster < 10 ms, 0 lost |")
p99 = settle_p99()
settle = "n/a" if p99 is None else ("> 5 s" if p99 == float("inf") else f"<= {p99 * 1000:g} ms")
block = "\n".join([
  "<!-- cluster:begin (written by tests/bench/cluster.sh) -->",
  f"Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {cpu}, {os.cpu_count()} CPUs; every broker process pinned to CPU 0",
  f"(the three nodes share the core one node gets), raftmq-bench to CPU 1; 64-byte payloads; median of {reps} runs of {duration} s; {raftmq}.",
  "",
  "| test | one node | three nodes | ratio | target |",
  "| --- | --- | --- | --- | --- |",
  *rows,
  "",
  "A SUBACK waits for every peer's acknowledgement of the new route, so SUBSCRIBE to SUBACK is the time until the",
  "route is deliverable on every node; the probe publish from another node proves it.",
  f"Under a connect storm (5,000 clients connecting and subscribing at once, all nodes on one core) the SUBACK's wait",
  f"for the peers had p99 {settle} (raftmq_cluster_route_settle_seconds).",
  "<!-- cluster:end -->",
])
text = open(out).read() if os.path.exists(out) else ""
begin, end = "<!-- cluster:begin", "<!-- cluster:end -->"
if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
else:
    text = text + "\n## Cluster\n\n" + block + "\n"
open(out, "w").write(text)
print(block)
PY
