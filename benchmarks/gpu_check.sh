#!/usr/bin/env bash
# One pass on a machine with an NVIDIA GPU: build giblet._C with CUDA kernels
# for the visible GPU, run the whole test suite (the CUDA cases included),
# `giblet validate` and `giblet bench --device cuda`, and keep every log and
# the bench JSON under $OUT (default build/gpu-check).
#
#   bash benchmarks/gpu_check.sh
#
# Python packages missing there (typer, rich, psutil, pytest, pytest-benchmark)
# may be brought as wheels in .whl/: they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"

# Only the architecture of the GPU at hand: the build takes a fraction of the two-architecture one.
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" GIBLET_CUDA=1 MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
status=$?
echo "build for sm_$arch: exit $status in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
[ $status -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

# The console script and the giblet_cli package, without touching dependencies or rebuilding.
GIBLET_SKIP_EXT=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1 \
  || echo "editable install failed (see install.log): CLI tests will fail" | tee -a "$OUT/summary.txt"

"$PYTHON" -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.txt" 2>&1
echo "tests: exit $? ($(tail -1 "$OUT/tests.txt"))" | tee -a "$OUT/summary.txt"
"$PYTHON" -m giblet_cli.main validate > "$OUT/validate.txt" 2>&1
echo "validate: exit $?" | tee -a "$OUT/summary.txt"
COLUMNS=160 "$PYTHON" -m giblet_cli.main bench --device cuda --json "$OUT/bench-cuda.json" > "$OUT/bench-cuda.txt" 2>&1
echo "bench: exit $?" | tee -a "$OUT/summary.txt"
cat "$OUT/bench-cuda.txt"
