#!/usr/bin/env bash
# One command that proves the CUDA path on one GPU (fits in 8 minutes on an H100 or H200):
#   1. tests       the CUDA tests (tests/test_cuda.py, marked `cuda`)
#   2. pipeline    the default pipeline with dist.device=cuda (every stage in process on the GPU)
#   3. torchrun    students as a torchrun stage on nccl (a one-rank group: DDP, the bucketed
#                  meta-gradient all_reduce and the pilot's differentiable all_reduce on nccl)
#   4. concurrent  three students at once sharing the GPU, against the same three in sequence
#   5. throughput  benchmarks/gpu_throughput.py (pipeline loop vs a hand-written loop, bf16)
#   6. meta_engine benchmarks/meta_engine.py --device cuda
#   7. distill     benchmarks/distill_cost.py on CUDA (meta_distill vs kd per student step)
#
#   benchmarks/gpu_check.sh [PART ...]     (default: every part, in that order)
#
# Every part runs even when an earlier one failed; the exit status is the number of parts
# that failed.  Each part's JSON, one log (gpu_check.log) and a summary of each part's exit
# status and seconds (gpu_check.json) go to $OUT when set, else results/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-results/gpu_check}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false METADISTILL_PROGRESS=0 PYTHONUNBUFFERED=1
export METADISTILL_HOME="${METADISTILL_HOME:-$(mktemp -d)/home}"
if command -v metadistill >/dev/null; then MD=(metadistill); else MD=("$PY" -m pipelines.cli); fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests pipeline torchrun concurrent throughput meta_engine distill)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# Small students, three seeds: the default digits pipeline's budget.
SWEEP=(--set dist.device=cuda --set 'student.methods=[scratch,kd,meta_distill]' --set 'student.seeds=[0,1,2]')

part() {
  case "$1" in
    tests) "$PY" -m pytest -q -m cuda -rs tests/test_cuda.py ;;
    pipeline) "${MD[@]}" run --set dist.device=cuda --summary "$OUT_DIR/pipeline_cuda.json" ;;
    torchrun) "${MD[@]}" run --set dist.device=cuda --set dist.launcher=torchrun --set dist.nproc=1 \
                --set 'student.methods=[kd,maml_init,meta_distill,meta_distill_pilot]' --set 'student.seeds=[0]' \
                --set tracking.register_best=false --summary "$OUT_DIR/torchrun_nccl.json" ;;
    concurrent) "$PY" -m benchmarks.concurrent_students "${SWEEP[@]}" --json "$OUT_DIR/concurrent_students.json" ;;
    throughput) "$PY" -m benchmarks.gpu_throughput --device cuda --settings fp32,tf32,bf16,bf16+cl,bf16+cl+compile \
                  --json "$OUT_DIR/gpu_throughput.json" ;;
    meta_engine) "$PY" -m benchmarks.meta_engine --device cuda --seconds 6 --rounds 3 \
                   --only engine_vmap,engine_loop,func_vmap,func_loop --json "$OUT_DIR/meta_engine_cuda.json" ;;
    distill) "$PY" -m benchmarks.distill_cost --set dist.device=cuda --repeats 2 --json "$OUT_DIR/distill_cost_cuda.json" ;;
    *) echo "unknown part $1" >&2; return 2 ;;
  esac
}

failed=0
summary="{"
for p in "${PARTS[@]}"; do
  echo "=== $p ==="
  start=$SECONDS
  part "$p" 2>&1 | tee -a "$OUT_DIR/gpu_check.log" | tail -n 40
  code=${PIPESTATUS[0]}
  secs=$((SECONDS - start))
  echo "=== $p: exit $code in ${secs}s ==="
  [ "$code" -ne 0 ] && failed=$((failed + 1))
  summary+="\"$p\": {\"exit\": $code, \"seconds\": $secs}, "
done
echo "${summary%, }}" > "$OUT_DIR/gpu_check.json"
cat "$OUT_DIR/gpu_check.json"
exit "$failed"
