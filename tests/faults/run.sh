#!/usr/bin/env bash
# Runs the fault-injection suite and writes its results table into docs/reliability.md
# (between the "faults-table" markers).
#
#   bash tests/faults/run.sh            # the short version CI runs (100 messages per publisher)
#   RAFTMQ_FAULTS_SCALE=10 bash tests/faults/run.sh   # the long version
#   bash tests/faults/run.sh --ignored  # also any scenario marked ignored (none now)
set -euo pipefail
cd "$(dirname "$0")/../.."
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
extra=()
[ "${1:-}" = "--ignored" ] && extra=(--include-ignored)
RAFTMQ_FAULTS_REPORT="$report" cargo test -p raftmq-tests --test faults -- --test-threads=1 "${extra[@]}" || status=$?
python3 - "$report" <<'PY'
import sys, re, datetime
rows = sorted(set(open(sys.argv[1]).read().splitlines()))
head = ("| fault | operations checked | lost | QoS 2 duplicated | reordered | longest time without an acknowledgement | until every publisher was acknowledged again |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n")
table = head + "\n".join(rows) + "\n"
import os
scale = os.environ.get("RAFTMQ_FAULTS_SCALE", "1")
stamp = f"Measured {datetime.date.today()} at scale {scale} ({int(scale) * 100} messages per publisher; `RAFTMQ_FAULTS_SCALE={scale} bash tests/faults/run.sh`).\n\n"
doc = open("docs/reliability.md").read()
doc = re.sub(r"(<!-- faults-table -->\n).*?(<!-- /faults-table -->)", lambda m: m.group(1) + stamp + table + m.group(2), doc, flags=re.S)
open("docs/reliability.md", "w").write(doc)
print(table)
PY
exit "${status:-0}"
