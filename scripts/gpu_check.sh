#!/usr/bin/env bash
# GPU check: the CUDA tests and bench_one_batch on CUDA, on one GPU, in under 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh            # from anywhere; results under ${OUT:-benchmark/results}/gpu_check/
#
# Steps (each under its own time limit; the first that fails stops the script with a message and its code):
#   0. preflight (seconds): a CUDA device that torch sees, the modules the runtime imports; the repository's three
#      packages (python/, gyges/, sgl-kernel/) come from PYTHONPATH when they are not installed, so nothing is
#      downloaded (a GPU machine without network works)
#   1. Triton kernels compiled for the GPU (<= 70 s): python -m sgl_kernel.triton_ops.check (decode / extend
#      attention and the page-block copy against the torch references; fills Triton's cache for step 2)
#   2. CUDA tests (<= 210 s): test/test_cuda_path.py: ModelRunner on cuda (triton and torch_native attention)
#      against transformers, the start-up peak within the budget (one arena, weights loaded into it), moves in a
#      GPU arena, sglang.Engine --device cuda greedy == transformers; TP2 over NCCL when 2 GPUs are present.
#      A skip for any other reason than "needs 2 GPUs" fails the check.
#   3. bench_one_batch --device cuda (<= 170 s): a 0.38B-parameter demo Llama (hidden 2048, 8 layers, GQA 16/8
#      heads) in bfloat16, triton and torch_native attention against transformers on the same GPU, batch 1/16/64,
#      in 256 / out 32; decode against the HBM roofline (bytes per step / measured device copy bandwidth)
# Exit codes: 2 no GPU or modules missing, 3 kernel check or tests failed (or tests skipped), 4 benchmark failed.
# Status: written without a GPU at hand (no CUDA in the session that wrote it); its first run on a GPU is its test.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${OUT:-$ROOT/benchmark/results}/gpu_check"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }
fail() { local code=$1; shift; say "FAILED: $*"; exit "$code"; }

# ---- 0. preflight ---------------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version \
    --format=csv,noheader || say "nvidia-smi not found"
cd /tmp  # never import the packages from the repository root by accident
python - "$ROOT" <<'EOF' || fail 2 "preflight (see above): this check needs a CUDA GPU and the runtime's modules"
import importlib.util, os, sys
root = sys.argv[1]
try:
    import torch
except ImportError:
    sys.exit("torch is not installed")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
             "run this on a machine with an NVIDIA GPU")
need = ["transformers", "tokenizers", "safetensors", "gguf", "numpy", "zmq", "fastapi", "uvicorn", "uvloop",
        "orjson", "prometheus_client", "tqdm", "xgrammar", "psutil", "jinja2", "requests", "aiohttp", "triton",
        "pytest", "ninja"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules: {', '.join(missing)} "
             "(pip install -e ./gyges -e ./sgl-kernel -e './python[test,bench]' where the network allows)")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}, {torch.cuda.mem_get_info(0)[0] / 2**30:.1f} GiB free")
EOF
for pkg in sglang:python gyges:gyges sgl_kernel:sgl-kernel; do
    mod=${pkg%%:*}; dir=${pkg#*:}
    if ! python -c "import $mod" >/dev/null 2>&1; then
        export PYTHONPATH="$ROOT/$dir${PYTHONPATH:+:$PYTHONPATH}"
        say "$mod not installed: using $ROOT/$dir on PYTHONPATH"
    fi
done
python -c "import sglang, gyges, sgl_kernel; print('sglang from', sglang.__file__)" \
    || fail 2 "the repository's packages do not import"

# ---- 1. Triton kernels on the GPU ----------------------------------------------------------------------------
say "Triton kernel self-check"
timeout 70 python -m sgl_kernel.triton_ops.check --device cuda 2>&1 | tee "$RESULTS/kernels.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || fail 3 "Triton kernel self-check (exit $rc; 124 = over 70 s); log: $RESULTS/kernels.log"

# ---- 2. CUDA tests --------------------------------------------------------------------------------------------
say "CUDA tests"
cd "$ROOT"
timeout 210 python -m pytest -q -rs -p no:cacheprovider test/test_cuda_path.py 2>&1 | tee "$RESULTS/tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || fail 3 "CUDA tests (exit $rc; 124 = over 210 s); log: $RESULTS/tests.log"
if grep -E '^SKIPPED' "$RESULTS/tests.log" | grep -v 'needs 2 GPUs'; then
    fail 3 "CUDA tests were skipped on a GPU machine (lines above)"
fi

# ---- 3. bench_one_batch on CUDA -------------------------------------------------------------------------------
say "bench_one_batch --device cuda"
cd /tmp
timeout 170 python "$ROOT/benchmark/bench_one_batch.py" --device cuda --tp-sizes 1 \
    --attention-backends triton torch_native --dtype bfloat16 --batch-sizes 1 16 64 --input-len 256 \
    --output-len 32 --repeats 3 --hidden-size 2048 --num-layers 8 --num-heads 16 --num-kv-heads 8 \
    --intermediate-size 5632 --model-dir /tmp/sglang-gpu-check-llama --result-dir "$RESULTS" --no-plot \
    2>&1 | tee "$RESULTS/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || fail 4 "bench_one_batch (exit $rc; 124 = over 170 s); log: $RESULTS/bench.log"

say "passed: Triton kernels, CUDA tests and bench_one_batch; table in $RESULTS/bench_one_batch.md"
