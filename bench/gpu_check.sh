#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200; no network): versions, build, GPU tests, host time per call,
# kernel microbenchmarks (every SDDMM variant side by side), eager and CUDA-graphed layer steps, the
# model-level comparison, quantized bases. Results go to $OUT (when set) or bench/results/.
#
# The whole run ends within BUDGET seconds (default 400, issue 31: <= 7 minutes with start-up): steps run in
# order of how much their numbers are needed (kernel rows of every SDDMM variant, then the model-level table), each under its own limit, and each limit is cut to the time left, so a slow
# step costs the ones after it, never the deadline. A step with less than its minimum left is skipped (said).
#   bash bench/gpu_check.sh
# Dry run on the CPU at small sizes (checks every step's command line; times nothing useful):
#   DEVICE=cpu DTYPE=float32 SHAPES="96x64" TOKENS=32 DENSITIES="1e-2" LAYER_DENSITIES="1e-2" SMALL=1 \
#     OUT=/tmp/gpu_dry bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SHAPES="${SHAPES:-4096x4096 11008x4096 4096x11008}"
TOKENS="${TOKENS:-4096}"
DENSITIES="${DENSITIES:-1e-4 1e-3 1e-2}"
LAYER_DENSITIES="${LAYER_DENSITIES:-1e-3 1e-2}"
SMALL="${SMALL:-}"      # set: small shapes everywhere (the CPU dry run)
BUDGET="${BUDGET:-400}"
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi
log="$OUT/gpu_check.log"
: > "$log"
start=$SECONDS
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), $((SECONDS - start)) s in)" | tee -a "$log"; }
# lim WANT [MIN]: WANT seconds, or what is left before the deadline (less 5 s); prints nothing (and the step
# is skipped) when fewer than MIN seconds are left
lim() {
  local want=$1 min=${2:-10} left=$((BUDGET - (SECONDS - start) - 5))
  ((left < want)) && want=$left
  if ((want < min)); then echo "  skipped: ${left} s left before the ${BUDGET} s deadline" | tee -a "$log" >&2; return 1; fi
  echo "$want"
}
small() { [ -n "$SMALL" ] && echo "$1" || echo "$2"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs') if torch.cuda.is_available() else print('no CUDA device')"
} 2>&1 | tee -a "$log"


step "build the native extension (csrc/) for this GPU"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" APET_REQUIRE_EXT=1
if [ "$DEVICE" = cpu ]; then echo "  (dry run: the extension already built here is used)" | tee -a "$log"
elif t=$(lim 120 60); then
  timeout "$t" "$PY" -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -15 | tee -a "$log" \
    || echo "pip install -e . failed; using the source tree on PYTHONPATH" | tee -a "$log"
fi
"$PY" -c "import apet_kernels, json; print(json.dumps(apet_kernels.backends(), indent=1))" 2>&1 | tee -a "$log"


step "kernel microbenchmarks + layer steps: triton and native side by side (native: warp-per-delta and staged SDDMM)"
if t=$(lim 110 30); then
  TRITON_PRINT_AUTOTUNING=1 timeout "$t" "$PY" bench/bench_kernels.py --device "$DEVICE" --dtype "$DTYPE" --shapes $SHAPES \
    --tokens "$TOKENS" --densities $DENSITIES --layer-densities $LAYER_DENSITIES --out "$OUT" --tag llama7b \
    $([ "$DEVICE" = cuda ] && echo --profile) 2>&1 | grep -v "^Autotuning kernel" | tee -a "$log"
fi


step "model-level comparison (bench/compare.py, bf16, interleaved rounds)"
if t=$(lim 100 40); then
  if [ -n "$SMALL" ]; then cmp=(--model tiny --rounds 2 --warmup 1 --methods frozen "sparse merged" "lora (peft)")
  else cmp=(--rounds 4 --warmup 2); fi
  timeout "$t" "$PY" bench/compare.py --device "$DEVICE" --dtype "$DTYPE" --out "$OUT/compare" --no-plot "${cmp[@]}" \
    2>&1 | tail -24 | tee -a "$log"
  # the device tool returns a limited number of files: pack this folder into one
  [ -d "$OUT/compare" ] && tar -C "$OUT" -czf "$OUT/compare.tgz" compare && rm -rf "$OUT/compare"
fi


step "pytest -m gpu (real sizes, the staged SDDMM, host sync, CUDA graphs, FSDP2 + Trainer, quantized)"
# SIGINT, not SIGTERM: pytest then still prints what passed and failed before the limit
if t=$(lim 110 30); then
  timeout -s INT "$t" "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider -rfE 2>&1 | tail -30 | tee -a "$log"
fi


step "one layer's step eager and CUDA-graphed (torch.compile reduce-overhead): 3072x768, T=2048, 0.1%"
if t=$(lim 70 25); then
  TORCH_LOGS=perf_hints timeout "$t" "$PY" bench/graphed_step.py --device "$DEVICE" --dtype "$DTYPE" \
    $(small "--shape 96x64 --tokens 32 --rounds 2" "--rounds 5") --out "$OUT/graphed_step.md" 2>&1 \
    | grep -v "^W[0-9]" | tail -20 | tee -a "$log"
fi


step "host time per call (does a Triton call cost what its kernel does?)"
if t=$(lim 40 15); then
  timeout "$t" "$PY" bench/launch_overhead.py --device "$DEVICE" --dtype "$DTYPE" $(small "--shape 96x64 --tokens 32 --reps 3 --interpreted" "") \
    2>&1 | tee "$OUT/launch_overhead.md" | tail -40 | tee -a "$log"
fi


step "quantized bases: both strategies over NF4, bnb int8, torchao int8/int4 (bitsandbytes / torchao when present)"
# without network, they come from bench/wheels/ when carried:
# pip download --no-deps -d bench/wheels bitsandbytes==0.50.2 torchao==0.18.0  (~47 MB)
ls bench/wheels/*.whl >/dev/null 2>&1 && timeout 40 "$PY" -m pip install -q --no-index --no-deps bench/wheels/*.whl \
  2>&1 | tail -3 | tee -a "$log"
if ! "$PY" -c "import bitsandbytes, torchao" >/dev/null 2>&1; then
  echo "bitsandbytes / torchao not importable: quantized bases not checked here" | tee -a "$log"
elif t=$(lim 80 30); then
  if [ -n "$SMALL" ]; then cmp=(--model tiny --rounds 1 --warmup 1 --methods frozen "sparse dequantized" --quant nf4)
  else cmp=(--model base --rounds 4 --warmup 2 --methods frozen "sparse dequantized" "sparse unmerged" "lora (peft)"
            --quant nf4 int8 torchao-int8 torchao-int4); fi
  timeout "$t" "$PY" bench/compare.py --device "$DEVICE" --dtype "$DTYPE" "${cmp[@]}" --no-plot \
    --out "$OUT/compare_quant" 2>&1 | tail -16 | tee -a "$log"
  [ -d "$OUT/compare_quant" ] && tar -C "$OUT" -czf "$OUT/compare_quant.tgz" compare_quant && rm -rf "$OUT/compare_quant"
fi


step "host time per layer (64x64, T=1 and 4): frozen, merged, unmerged, PEFT LoRA"
if t=$(lim 30 15); then
  timeout "$t" "$PY" bench/forward_overhead.py $(small "--rounds 5 --model tiny" "--rounds 200") 2>&1 \
    | tee "$OUT/forward_overhead.md" | tail -24 | tee -a "$log"
fi


step "every kernel test on $DEVICE tensors (odd shapes, all dtypes, poisoned outputs, layer vs dense-mask)"
if t=$(lim 90 20); then
  timeout -s INT "$t" "$PY" -m pytest -q -x tests/test_kernels.py -m "not gpu" -p no:cacheprovider 2>&1 \
    | tail -8 | tee -a "$log"
fi
# the device tool returns a limited number of files: the CSVs (the .md files hold the same tables) travel as one
(cd "$OUT" && ls *.csv >/dev/null 2>&1 && tar -czf csv.tgz *.csv && rm -f *.csv)
step "done"
ls -la "$OUT" | tee -a "$log"
