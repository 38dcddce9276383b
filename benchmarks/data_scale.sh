#!/usr/bin/env bash
# Prepare a Sherlock-sized dataset and measure what the store costs:
# prepare time and peak RAM (GNU time), store size on disk, batch read times.
#
#   bash benchmarks/data_scale.sh [WORK_DIR]     (default build/data_scale; needs ~12 GB free)
#
# Writes WORK_DIR/results.md. The dataset is synthesized once (`giblet data synth
# --preset sherlock-scale`, ~8 min on 2 cores) and kept for later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/data_scale}
bin=.venv/bin
mkdir -p "$work"
data="$work/sherlock_scale"
store="$work/store"
config=benchmarks/sherlock_scale.yaml
if [ ! -d "$data" ]; then
    /usr/bin/time -f "%e s, peak RSS %M KB" -o "$work/synth.time" "$bin/giblet" data synth "$data" --preset sherlock-scale
fi
du -sb "$data" | cut -f1 > "$work/data.bytes"
rm -rf "$store"
/usr/bin/time -f "%e %M" -o "$work/prepare.time" "$bin/giblet" data prepare "$data" --config "$config" --out "$store" | tee "$work/prepare.log"
"$bin/giblet" data bench "$store" --repeats 200 | tee "$work/bench.txt"
read -r seconds peak_kb < "$work/prepare.time"
store_bytes=$(du -sb "$store" | cut -f1)
{
    echo "| measure | value | goal |"
    echo "| --- | ---: | ---: |"
    echo "| prepare time | $(printf '%.0f' "$seconds") s | |"
    echo "| peak RAM of prepare (max RSS) | $(awk -v k="$peak_kb" 'BEGIN{printf "%.2f GiB", k/1048576}') | < 6 GB |"
    echo "| store on disk | $(awk -v b="$store_bytes" 'BEGIN{printf "%.2f GiB", b/1073741824}') | < 8 GB |"
    echo "| input folder on disk | $(awk -v b="$(cat "$work/data.bytes")" 'BEGIN{printf "%.2f GiB", b/1073741824}') | |"
} > "$work/results.md"
cat "$work/results.md"
