#!/usr/bin/env bash
# Issue 9's CUDA figures and CUDA tests in one call on a lent GPU machine (~8 minutes on an H200).
#
# Here, once:   .venv/bin/python benchmarks/device_data.py pack      # device_data/ (git-ignored, ~59 MiB)
# Then, with the device tool (a session has 15 minutes of device time: one call, no reruns):
#   run(command="bash benchmarks/gpu_check.sh", carry=["device_data"], timeout_s=590)
# The machine has no internet and its own python3 with torch; multitag runs from the checkout
# (python3 -m multitag.cli), missing small wheels come from device_data/wheels. Every step has its
# own time limit inside one overall budget (GPU_CHECK_BUDGET_S, default 540 s): a step that would not
# fit is skipped and said so, and what finished is already in $OUT. Results: $OUT/summary.txt (all
# the figures), one log per step, bench JSON.
#
# A smoke test of this script on a CPU machine (tiny sizes, no GPU): GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
PY=${PYTHON:-python3}
DATA=${GPU_CHECK_DATA:-/tmp/multitag_data}
RUNS=${GPU_CHECK_RUNS:-/tmp/multitag_runs}
export PYTHONUNBUFFERED=1 MULTITAG_CACHE=${MULTITAG_CACHE:-/tmp/multitag_cache}
mkdir -p "$OUT" "$RUNS"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log, within what is left of the budget.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 20 ]; then say "== $name: skipped, ${left} s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "   rc $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ' (timed out)')"
}

say "gpu_check $(date -u +%FT%TZ), device $DEVICE, quick $QUICK, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$SUMMARY"
if ls device_data/wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/multitag_site \
    device_data/wheels/*.whl && export PYTHONPATH=/tmp/multitag_site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available()
else None, 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" 2>&1 | tee -a "$SUMMARY"
say "cpu: $(nproc) cores, $($PY -c 'from multitag.runtime import describe_cpu; print(describe_cpu())' 2>&1)"
if [ ! -d "$DATA/cifar10" ]; then
  $PY benchmarks/device_data.py unpack device_data "$DATA" 2>&1 | tee -a "$SUMMARY"
fi

if [ "$QUICK" = 1 ]; then
  IMAGES=64 STEPS=2 ROUNDS=1 CIFAR_SET=(--set train.epochs=1); DDP_EPOCHS=1
else
  IMAGES=256 STEPS=4 ROUNDS=3 CIFAR_SET=(); DDP_EPOCHS=3         # cifar10_speed's own 10 epochs
fi

# 1. The CUDA tests (they skip on the CPU machines CI runs on).
step pytest 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_cache.py \
  tests/test_explain.py::test_cuda_matches_cpu tests/test_runtime.py tests/test_loader.py
tail -n 3 "$OUT/pytest.log" 2>/dev/null | tee -a "$SUMMARY"

# 2. CIFAR-10 time to accuracy: the cifar10_speed recipe with per-epoch test accuracy, on all 50,000
#    training images without val (airbench's protocol, as the CPU figure in RESULTS.md). Its caching line
#    is the decode speed on the host's cores (decode_workers(): 4,121 img/s with the old fixed 2 threads).
step cifar_speed 240 $PY benchmarks/bench_cifar_speed.py --data "$DATA/cifar10" --out "$RUNS/cifar10-speed" \
  --set train.device=$DEVICE --set "data.split_fractions=[1.0,0.0,0.0]" "${CIFAR_SET[@]}"
grep -E "^run |^ +[0-9]+ |time to|kept model|runtime|caching images: 60000" "$OUT/cifar_speed.log" 2>/dev/null | tee -a "$SUMMARY"

# 3. VOC2007 training throughput side by side with the naive loop, and the GPU's conv peak (the ceiling
#    rows): ResNet-18 layout at 224 px, and the pretrained recipe's EfficientNet-Lite0 (random init:
#    weights do not change the speed).
for model in advanced_cnn efficientnet_lite0; do
  step "bench_$model" 150 $PY -m multitag.cli bench --device $DEVICE --data "$DATA/voc2007" --model $model \
    --image-size 224 --batch-size 32 --images $IMAGES --steps $STEPS --rounds $ROUNDS --no-inference --scaling ""
  grep -E "naive|multitag|AdamW|runtime|every FLOP" "$OUT/bench_$model.log" 2>/dev/null | cut -c1-150 | tee -a "$SUMMARY"
done

# 4. DDP sanity on one GPU: plain vs torchrun x1 (NCCL), same recipe and seed.
step ddp 120 $PY benchmarks/bench_ddp.py --nproc 1 --epochs $DDP_EPOCHS --out "$RUNS/bench_ddp" \
  --set train.device=$DEVICE
grep -E "^\|" "$OUT/ddp.log" 2>/dev/null | tee -a "$SUMMARY"

say "done in $SECONDS s"
