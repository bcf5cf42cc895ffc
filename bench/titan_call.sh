#!/usr/bin/env bash
# One call on the lent GPU machine (run from the repository root, carrying .whl and .gpu_carry/titan,
# which bench/titan_carry.sh builds): the wheels installed, the GPU named, then
#   bash bench/titan_call.sh [--update] NAME CASES BUDGET_S [more bench_titan.py options]
# --update first times the optimizer update alone (bench/optimizer_update.py, about a minute).
# Writes $OUT/NAME.json (the record, after every case), $OUT/NAME.log and $OUT/NAME_logs.tgz (each
# case's own log); bench_titan's table of the cases and ratios is printed last.
# BUDGET_S counts from the call's start: the install and --update come out of it.
set -o pipefail
update=false
if [ "${1:-}" = "--update" ]; then update=true; shift; fi
name=${1:?NAME}; cases=${2:?CASES}; budget=${3:?BUDGET_S}; shift 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader
if $update; then
    python3 bench/optimizer_update.py --record "$OUT/update.json" 2>&1 | tee "$OUT/update.log" | grep -v Warning | tail -6
fi
python3 bench/bench_titan.py --budget-s "$((budget - SECONDS))" --work "/tmp/$name" --titan-src "$PWD/.gpu_carry/titan/src" \
    --record "$OUT/$name.json" --cases "$cases" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\[bench\]|^\||^g7_|^target|Error' | tail -60
tar -czf "$OUT/${name}_logs.tgz" -C /tmp --exclude=titan_out "$name" 2>/dev/null
