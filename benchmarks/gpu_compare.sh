#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the fused ops of this tree against those of an earlier commit, on the same
# GPU in one pass. Both trees are built for the GPU at hand (in parallel), then `giblet bench --device cuda`
# times gather_project and bottleneck on this tree, on the other, and on this tree again (the spread between
# the two passes is the noise), and benchmarks/profile_ops.py profiles this tree. Logs go under $OUT.
#
#   bash benchmarks/gpu_compare.sh REV        # e.g. c7ad4ea
set -uo pipefail
cd "$(dirname "$0")/.."
REV="${1:?usage: bash benchmarks/gpu_compare.sh REV (a commit to compare with)}"
OUT="${OUT:-build/gpu-compare}"
PYTHON="${PYTHON:-python3}"
OLD="$OUT/tree-$REV"
mkdir -p "$OLD"
export PYTHONUNBUFFERED=1 GIBLET_PROGRESS=0
git archive "$REV" setup.py setup.cfg pyproject.toml csrc giblet | tar -x -C "$OLD" || { echo "cannot export $REV"; exit 1; }
# Its command line too, as the package giblet_cli (setup.py maps cli/ to it): the other tree is benched with its own
# `giblet bench`, whose imports match its giblet (giblet.bench was one module before it became a package).
rm -rf "$OLD/giblet_cli" && git archive "$REV" cli | tar -x -C "$OLD" && mv "$OLD/cli" "$OLD/giblet_cli" \
  || echo "no cli/ in $REV: benching it with this tree's command line"
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
jobs=$(( ($(nproc) + 1) / 2 ))
start=$(date +%s)
note() { echo "$1: exit $2 after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"; }
(cd "$OLD" && TORCH_CUDA_ARCH_LIST="$arch" GIBLET_CUDA=1 MAX_JOBS=$jobs "$PYTHON" setup.py build_ext --inplace > build.log 2>&1; note "build $REV" $?) &
TORCH_CUDA_ARCH_LIST="$arch" GIBLET_CUDA=1 MAX_JOBS=$jobs "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; note "build this tree" $?
GIBLET_SKIP_EXT=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1
wait
cases=(--case gather_project --case "bottleneck[0% lesioned]")
bench() {  # bench NAME [PYTHONPATH]: giblet and giblet_cli from that folder (found before the editable install's)
  COLUMNS=160 PYTHONPATH="${2:-.}" timeout 300 "$PYTHON" -m giblet_cli.main bench --device cuda "${cases[@]}" \
    --json "$OUT/bench-$1.json" > "$OUT/bench-$1.txt" 2>&1
  note "bench $1" $?
}
bench this-1
bench "$REV" "$OLD"
bench this-2
PYTHONPATH=. timeout 120 "$PYTHON" benchmarks/profile_ops.py cuda sherlock > "$OUT/profile.txt" 2>&1; note profile $?
for name in this-1 "$REV" this-2; do echo "== $name"; grep -E "│" "$OUT/bench-$name.txt"; done
