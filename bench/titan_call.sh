#!/usr/bin/env bash
# One call on the lent GPU machine (run from the repository root, carrying .whl and .gpu_carry/titan,
# which bench/titan_carry.sh builds): the wheels installed, the GPU named, then
#   bash bench/titan_call.sh [--update] NAME CASES BUDGET_S [more bench_titan.py options]
# --update first times the optimizer update alone (bench/optimizer_update.py, about a minute).
# Writes $OUT/NAME.json (the record, after every case), $OUT/NAME.log and $OUT/NAME_logs.tgz (each
# case's own log), and prints each case's figures last.
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
    --record "$OUT/$name.json" --cases "$cases" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\[bench\]|Error' | tail -40
tar -czf "$OUT/${name}_logs.tgz" -C /tmp --exclude=titan_out "$name" 2>/dev/null
python3 - "$OUT/$name.json" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))
for name, entry in record["results"].items():
    r = entry.get("result") or {}
    print(f"{name:40s} {r.get('tokens_per_s')!s:>9} tokens/s  MFU {r.get('mfu_vs_bf16_matmul')}  "
          f"peak {r.get('peak_allocated_gib')} GiB  step {r.get('step_ms_median')} ms  first {r.get('first_step_s')} s  "
          f"{entry.get('failed') or ''}")
print({k: record.get(k) for k in ("g7_vs_torchtitan", "g7_8k_vs_torchtitan", "g7_fp8_vs_torchtitan")})
PY
