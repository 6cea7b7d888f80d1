#!/bin/bash
# Times the README's first command on a fresh clone: the install and the job separately.
#   docs/bench/first_run.sh <label> [busy] [repo]
# busy: one `yes` process keeps one core busy throughout (the "shared machine" condition).
# repo: what to clone (default: this checkout). Prints one line: commit, exit code, install and
# job seconds, load average at start and end, the thread count chosen and the final line.
set -u
label=$1; busy=${2:-}; repo=${3:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
dir=/tmp/first-run-$label
rm -rf "$dir" && git clone -q "$repo" "$dir" && cd "$dir" || exit 1
BUSY=
if [ "$busy" = busy ]; then yes > /dev/null & BUSY=$!; fi
sleep 2
load0=$(cut -d' ' -f1 /proc/loadavg)
t0=$(date +%s.%N)
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[dev]' > "$dir.pip.log" 2>&1
t1=$(date +%s.%N)
python train.py > "$dir.train.log" 2>&1
rc=$?
t2=$(date +%s.%N)
load1=$(cut -d' ' -f1 /proc/loadavg)
[ -n "$BUSY" ] && kill "$BUSY"
echo "$label commit=$(git rev-parse --short HEAD) rc=$rc install_s=$(echo "$t1 - $t0" | bc) job_s=$(echo "$t2 - $t1" | bc)" \
     "load_start=$load0 load_end=$load1 $(grep -hE 'CPU threads|^final' "$dir.train.log" | tr '\n' ' ')"
