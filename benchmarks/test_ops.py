"""pytest-benchmark suite of the native ops vs their baselines (the cases of giblet.bench.ops).

    pytest benchmarks/test_ops.py --benchmark-only                       # Sherlock sizes on the CPU
    GIBLET_BENCH_SIZE=small GIBLET_BENCH_DEVICE=cuda pytest benchmarks/test_ops.py --benchmark-only

Each benchmark group is one case; compare the medians within a group. Peak
memory is reported by `giblet bench`, which measures it in fresh processes.
"""

import functools
import os

import pytest
import torch

from giblet.bench.ops import CASES, SIZES

SIZE = os.environ.get("GIBLET_BENCH_SIZE", "sherlock")
DEVICE = torch.device(os.environ.get("GIBLET_BENCH_DEVICE", "cpu"))


@functools.lru_cache(maxsize=1)
def build_case(name):
    """One case at a time in memory (Sherlock's bottleneck weight alone is 351 MB)."""
    return CASES[name](SIZES[SIZE], DEVICE)


def variant_names():
    small = {name: make(SIZES["small"], torch.device("cpu")) for name, make in CASES.items()}
    return [(name, variant.name) for name, case in small.items() for variant in case.variants]


@pytest.mark.parametrize("case_name, variant", variant_names())
def test_op(benchmark, case_name, variant):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("GIBLET_BENCH_DEVICE=cuda but no CUDA GPU on this machine")
    case = build_case(case_name)
    run = next(v.run for v in case.variants if v.name == variant)
    benchmark.group = f"{case_name}: {case.description}"
    benchmark.extra_info["device"] = str(DEVICE)
    if DEVICE.type == "cuda":
        def run_synced():
            run()
            torch.cuda.synchronize()
        benchmark.pedantic(run_synced, rounds=10, warmup_rounds=2)
    else:
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
