"""Where the time of giblet's ops goes, next to their baselines: host time per call and GPU kernel time.

    python benchmarks/profile_ops.py [DEVICE] [SIZE]        # default: cuda sherlock

For each variant of the gather_project and bottleneck cases of ``giblet bench`` (forward + backward), after 3
warm-up calls: the host time to issue one call (20 calls without waiting for the device), the time per call
when the device is waited for only at the end (asynchronous) and after every call (synchronised), and the
profiler's table of the 8 costliest operators and kernels over 5 calls (on a GPU, also the 12 entries of most host
time: launches, and waits such as cudaStreamSynchronize). On a GPU a variant whose issue time is
close to its asynchronous time is bound by the host (Python, launches, synchronisations), not by its kernels.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from giblet.bench.ops import CASES, SIZES


def main(device_name: str = "cuda", size: str = "sherlock") -> None:
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for name in ("gather_project", "bottleneck[0% lesioned]"):
        case = CASES[name](SIZES[size], device)
        for variant in case.variants:
            for _ in range(3):
                variant.run()
            sync()
            calls = 20
            start = time.perf_counter()
            for _ in range(calls):
                variant.run()
            issued = (time.perf_counter() - start) / calls
            sync()
            asynchronous = (time.perf_counter() - start) / calls
            start = time.perf_counter()
            for _ in range(calls):
                variant.run()
                sync()
            synchronised = (time.perf_counter() - start) / calls
            with profile(activities=activities) as profiled:
                for _ in range(5):
                    variant.run()
                sync()
            print(f"== {name} / {variant.name}: issue {issued * 1e3:.3f} ms/call, asynchronous {asynchronous * 1e3:.3f} "
                  f"ms/call, synchronised {synchronised * 1e3:.3f} ms/call", flush=True)
            print(profiled.key_averages().table(sort_by=sort_key, row_limit=8, max_name_column_width=60), flush=True)
            if cuda:
                # Where the host's own time goes (launches, waits such as cudaStreamSynchronize).
                print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                    max_name_column_width=60), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 3 or (len(sys.argv) > 2 and sys.argv[2] not in SIZES):
        sys.exit(__doc__)
    main(*sys.argv[1:])
