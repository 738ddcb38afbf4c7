#!/usr/bin/env bash
# The GPU benchmarks in one command, for a lent GPU machine (nothing is downloaded there):
#   bash bench/gpu/run.sh [all | attention linears decode moe ...]   (results under $OUT, default ./gpu_results)
# Several names run (in this file's order), so the 15 device minutes can be split over two calls, e.g.
#   bash bench/gpu/run.sh decode        then        bash bench/gpu/run.sh linears attention moe
# Wheels the machine lacks (gguf; the original exllamav2 0.3.2 and what its import needs) may be put in
# bench/gpu/vendor/ beforehand: they are installed from there with --no-deps. Each bench has its own time limit so one
# that hangs cannot eat the others' time; `--cpu` runs of each are in the test suite.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
what=" ${*:-all} "
if ls bench/gpu/vendor/*.whl >/dev/null 2>&1; then
  pip install -q --no-deps $(ls bench/gpu/vendor/*.whl | grep -v 'exllamav2-0') 2>&1 | tail -2
fi
orig=$(ls bench/gpu/vendor/exllamav2-0*.whl 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s)" | tee -a "$OUT/run.log"
  timeout "$secs" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo "   exit $?" | tee -a "$OUT/run.log"
  tail -40 "$OUT/$name.out"
}
case "$what" in *" all "*|*" attention "*) run attention 120 python bench/gpu/bench_attention.py ;; esac
case "$what" in *" all "*|*" linears "*) run linears 300 python bench/gpu/bench_linears.py --out "$OUT" ;; esac
case "$what" in *" all "*|*" decode "*) run decode 420 python bench/gpu/bench_decode.py --out "$OUT" --model-dir /tmp/bench_decode_8b ${orig:+--original-wheel "$orig"} ;; esac
case "$what" in *" all "*|*" moe "*) run moe 150 python bench/gpu/bench_moe.py ;; esac
