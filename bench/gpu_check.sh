#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200; no network): versions, build, GPU tests,
# kernel microbenchmarks and layer steps. Results go to $OUT (when set) or bench/results/.
# Sized to finish in about 9 minutes; each step has its own time limit so one slow step
# still leaves the others' results.
#   bash bench/gpu_check.sh
# Overrides for a quick dry run: SHAPES="512x384" TOKENS=256 DENSITIES="1e-3" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SHAPES="${SHAPES:-4096x4096 11008x4096 4096x11008}"
TOKENS="${TOKENS:-4096}"
DENSITIES="${DENSITIES:-1e-4 1e-3 1e-2}"
LAYER_DENSITIES="${LAYER_DENSITIES:-1e-3 1e-2}"
log="$OUT/gpu_check.log"
: > "$log"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee -a "$log"

step "build the native extension (csrc/) for this GPU"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" APET_REQUIRE_EXT=1
timeout 150 "$PY" -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -15 | tee -a "$log" \
  || echo "pip install -e . failed; using the source tree on PYTHONPATH" | tee -a "$log"
"$PY" -c "import apet_kernels, json; print(json.dumps(apet_kernels.backends(), indent=1))" 2>&1 | tee -a "$log"

step "optional libraries from bench/wheels/ (the machine has no network)"
# pip download --no-deps -d bench/wheels bitsandbytes==0.50.2 torchao==0.18.0 liger-kernel==0.8.5  (~47 MB; carry it)
ls bench/wheels/*.whl >/dev/null 2>&1 && timeout 60 "$PY" -m pip install -q --no-index --no-deps bench/wheels/*.whl \
  2>&1 | tail -3 | tee -a "$log"
"$PY" -m apet_kernels 2>&1 | tee -a "$log"

step "pytest -m gpu (real sizes, every kernel backend against the reference)"
timeout 110 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -25 | tee -a "$log"

step "quantized bases (bitsandbytes / torchao, installed above from bench/wheels/ when carried)"
if "$PY" -c "import bitsandbytes, torchao" >/dev/null 2>&1; then
  timeout -s INT 70 "$PY" -m pytest -q tests/test_quantized.py -p no:cacheprovider -k "cuda or trains" 2>&1 \
    | tail -12 | tee -a "$log"
  timeout 100 "$PY" bench/compare.py --device cuda --model base --methods frozen "sparse unmerged" "lora (peft)" \
    --quant nf4 int8 torchao-int8 torchao-int4 --rounds 5 --warmup 2 --no-plot --out "$OUT/compare_quant" 2>&1 \
    | tail -16 | tee -a "$log"
  [ -d "$OUT/compare_quant" ] && tar -C "$OUT" -czf "$OUT/compare_quant.tgz" compare_quant && rm -rf "$OUT/compare_quant"
else
  echo "bitsandbytes / torchao not importable: quantized bases not checked on this GPU" | tee -a "$log"
fi

step "host time per call (does a Triton call cost what its kernel does? h200-2026-11-27 said no)"
timeout 60 "$PY" bench/launch_overhead.py --device cuda 2>&1 | tee "$OUT/launch_overhead.md" | tail -40 | tee -a "$log"

step "kernel microbenchmarks + layer steps, triton and native side by side"
TRITON_PRINT_AUTOTUNING=1 timeout 170 "$PY" bench/kernels.py --device cuda --dtype bfloat16 --shapes $SHAPES \
  --tokens "$TOKENS" --densities $DENSITIES --layer-densities $LAYER_DENSITIES --out "$OUT" --tag llama7b \
  --profile 2>&1 | grep -v "^Autotuning kernel" | tee -a "$log"

step "model-level comparison (bench/compare.py, large preset, bf16, interleaved rounds)"
timeout 170 "$PY" bench/compare.py --device cuda --out "$OUT/compare" --rounds 6 --warmup 2 --no-plot 2>&1 \
  | tail -24 | tee -a "$log"
# the device tool returns at most 8 files: pack this folder into one
[ -d "$OUT/compare" ] && tar -C "$OUT" -czf "$OUT/compare.tgz" compare && rm -rf "$OUT/compare"

step "every kernel test on CUDA tensors (odd shapes, all dtypes, poisoned outputs, layer vs dense-mask)"
# SIGINT, not SIGTERM: pytest then still prints how many passed before the limit
timeout -s INT 90 "$PY" -m pytest -q -x tests/test_kernels.py -m "not gpu" -p no:cacheprovider \
  2>&1 | tail -15 | tee -a "$log"

step "host time per layer (64x64, T=1 and 4): frozen, merged, unmerged, PEFT LoRA"
timeout 60 "$PY" bench/forward_overhead.py --rounds 200 2>&1 | tee "$OUT/forward_overhead.md" | tail -24 | tee -a "$log"

step "issue 2 layer: 3072x768, T=2048, density 0.1%, bf16"
timeout 40 "$PY" bench/kernels.py --device cuda --dtype bfloat16 --layer-only --shapes 3072x768 --tokens 2048 \
  --layer-densities 1e-3 --out "$OUT" --tag issue2_bfloat16 2>&1 | tee -a "$log"
# the device tool returns at most 8 files: the CSVs (the .md files hold the same tables) travel as one
(cd "$OUT" && ls *.csv >/dev/null 2>&1 && tar -czf csv.tgz *.csv && rm -f *.csv)
step "done"
ls -la "$OUT" | tee -a "$log"
