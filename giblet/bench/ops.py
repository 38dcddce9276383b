"""Benchmarks of the native ops against their baselines, at Sherlock's sizes.

Each case times forward + backward (median of the timed calls; see
``time_medians``) of giblet's op and of one or more baselines on identical
inputs, and measures the
peak extra memory of each:

* CPU: in a fresh process (``python -m giblet.bench --probe``) with glibc's
  mmap threshold pinned at 64 KiB so freed blocks go back to the system; the
  peak resident set (VmHWM, reset through /proc/self/clear_refs) during one
  call, minus the resident set before it, minus the bytes of what the call
  returns (output and gradients, the same for every variant). What is left is
  the working memory the variant needed on top of its inputs and results.
* CUDA: ``torch.cuda.max_memory_allocated`` over one call, minus the memory
  allocated before it and the bytes returned.

``giblet bench`` prints the table (``--case`` one of ``CASES``, or all of them);
``benchmarks/test_ops.py`` runs the same cases under pytest-benchmark.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from giblet import ops
from giblet import ops_reference as ref

TR_SECONDS = 1.5
LOOKBACK_SECONDS = 10.0
VIDEO_FPS = 25.0
CODE_RATE = 75.0

# Sizes of the Sherlock dataset (see shared DESIGN): 160x90x3 uint8 frames,
# 48 frame slots per window, 85,810 voxels, EnCodec at 6 kbps = 8 codebooks.
SIZES: Dict[str, dict] = {
    "sherlock": dict(
        frames=4000, frame_dim=160 * 90 * 3, windows=16, slots=48, proj=256,
        batch=16, features=1024, voxels=85_810, lesioned=0.10,
        codebooks=8, code_frames=106_950, trs=950, codes_per_tr=112,
    ),
    "small": dict(
        frames=400, frame_dim=40 * 24 * 3, windows=16, slots=48, proj=64,
        batch=16, features=256, voxels=8_000, lesioned=0.10,
        codebooks=8, code_frames=10_695, trs=95, codes_per_tr=112,
    ),
}

Run = Callable[[], List[torch.Tensor]]


@dataclass
class Variant:
    name: str
    run: Run
    # Baselines whose memory is not comparable (the GEMM limit starts from a pre-gathered input).
    measure_memory: bool = True


@dataclass
class Case:
    name: str
    description: str
    variants: List[Variant]  # the first is giblet's op


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frame_windows(size: dict, consecutive: bool, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Frame indices of ``windows`` TR windows (lookback + TR, ``slots`` slots) via grid_index."""
    n_trs = int(size["frames"] / VIDEO_FPS / TR_SECONDS)
    first_tr = int(np.ceil(LOOKBACK_SECONDS / TR_SECONDS))
    if consecutive:
        trs = torch.arange(first_tr, first_tr + size["windows"])
    else:
        trs = first_tr + torch.randperm(n_trs - first_tr, generator=generator)[: size["windows"]]
    onsets = trs.double() * TR_SECONDS - LOOKBACK_SECONDS
    window = LOOKBACK_SECONDS + TR_SECONDS
    return ops.grid_index(size["frames"], VIDEO_FPS, onsets, window, size["slots"]).to(device)


def gather_project_case(size: dict, device: torch.device, consecutive: bool = False) -> Case:
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(0, 256, (size["frames"], size["frame_dim"]), dtype=torch.uint8, generator=generator).to(device)
    index = _frame_windows(size, consecutive, device, generator)
    weight = (torch.randn(size["proj"], size["frame_dim"], generator=generator) * 0.01).to(device).requires_grad_(True)
    bias = torch.zeros(size["proj"], device=device, requires_grad=True)
    grad_out = torch.randn(*index.shape, size["proj"], generator=generator).to(device)

    def fused() -> List[torch.Tensor]:
        out = ops.gather_project(table, index, weight, bias, scale=1 / 255)
        return [out, *torch.autograd.grad(out, (weight, bias), grad_out)]

    def reference() -> List[torch.Tensor]:
        out = ref.gather_project(table, index, weight, bias, scale=1 / 255)
        return [out, *torch.autograd.grad(out, (weight, bias), grad_out)]

    variants = [Variant("giblet", fused), Variant("reference", reference)]
    if not consecutive:
        # The GEMM limit: forward and weight-gradient GEMMs on an input that is already gathered as float.
        gathered = table[index.flatten()].float() / 255
        grad_2d = grad_out.reshape(-1, size["proj"])

        def gemm() -> List[torch.Tensor]:
            return [torch.mm(gathered, weight.detach().t()), torch.mm(grad_2d.t(), gathered)]

        variants.append(Variant("torch.mm", gemm, measure_memory=False))
    unique = int(torch.unique(index[index >= 0]).numel())
    kind = "consecutive TRs" if consecutive else "random TRs"
    return Case(
        "gather_project" + ("[consecutive]" if consecutive else ""),
        f"{size['frames']}x{size['frame_dim']} uint8 -> {size['windows']}x{size['slots']} slots ({kind}, "
        f"{unique} unique rows) -> P={size['proj']}, fwd+bwd",
        variants,
    )


def bottleneck_case(size: dict, device: torch.device, lesioned: float) -> Case:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size["batch"], size["features"], generator=generator).to(device).requires_grad_(True)
    weight = (torch.randn(size["voxels"], size["features"], generator=generator) * 0.03).to(device).requires_grad_(True)
    bias = torch.zeros(size["voxels"], device=device, requires_grad=True)
    mask = (torch.rand(size["voxels"], generator=generator) >= lesioned).to(device)
    grad_out = torch.randn(size["batch"], size["voxels"], generator=generator).to(device)

    def fused() -> List[torch.Tensor]:
        out = ops.bottleneck(x, weight, bias, mask)
        return [out, *torch.autograd.grad(out, (x, weight, bias), grad_out)]

    def unfused() -> List[torch.Tensor]:
        out = F.linear(x, weight, bias) * mask
        return [out, *torch.autograd.grad(out, (x, weight, bias), grad_out)]

    return Case(
        f"bottleneck[{lesioned:.0%} lesioned]",
        f"{size['batch']}x{size['features']} -> {size['voxels']} units, identity, fwd+bwd",
        [Variant("giblet", fused), Variant("F.linear*mask", unfused)],
    )


def resample_codes_loop(codes: np.ndarray, rate: float, onsets: np.ndarray, window: float, n_out: int, pad: int):
    """The baseline: a Python loop over TRs, numpy inside each."""
    n_q, n_samples = codes.shape
    out = np.full((len(onsets), n_q, n_out), pad, dtype=np.int64)
    centres = (np.arange(n_out) + 0.5) * window / n_out
    for i, onset in enumerate(onsets):
        position = np.floor((onset + centres) * rate).astype(np.int64)
        inside = (position >= 0) & (position < n_samples)
        out[i][:, inside] = codes[:, position[inside]]
    return out


def resample_codes_case(size: dict, device: torch.device) -> Case:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1024, (size["codebooks"], size["code_frames"]), dtype=torch.int16, generator=generator)
    codes = codes.to(device)
    onsets_np = np.arange(size["trs"]) * TR_SECONDS
    onsets = torch.from_numpy(onsets_np).to(device)
    codes_np = codes.cpu().numpy()
    n_out = size["codes_per_tr"]

    def fused() -> List[torch.Tensor]:
        return [ops.resample_codes(codes, CODE_RATE, onsets, TR_SECONDS, n_out, pad=1024)]

    def reference() -> List[torch.Tensor]:
        return [ref.resample_codes(codes, CODE_RATE, onsets, TR_SECONDS, n_out, pad=1024)]

    def loop() -> List[torch.Tensor]:
        return [torch.from_numpy(resample_codes_loop(codes_np, CODE_RATE, onsets_np, TR_SECONDS, n_out, 1024))]

    return Case(
        "resample_codes",
        f"codes {size['codebooks']}x{size['code_frames']} (75 Hz) -> {size['trs']} TRs x {n_out}",
        [Variant("giblet", fused), Variant("reference", reference), Variant("numpy loop", loop)],
    )


CASES = {
    "gather_project": lambda size, device: gather_project_case(size, device),
    "gather_project[consecutive]": lambda size, device: gather_project_case(size, device, consecutive=True),
    "bottleneck[0% lesioned]": lambda size, device: bottleneck_case(size, device, 0.0),
    "bottleneck[10% lesioned]": lambda size, device: bottleneck_case(size, device, size["lesioned"]),
    "resample_codes": lambda size, device: resample_codes_case(size, device),
}


PASSES = 2


def timed_calls(repeats: int) -> int:
    """Timed calls per variant: ``repeats`` rounded up to whole passes."""
    return -(-repeats // PASSES) * PASSES


def time_medians(runs: List[Run], device: torch.device, repeats: int) -> List[float]:
    """Median seconds of each run over ``timed_calls(repeats)`` timed calls.

    Each run is timed in consecutive calls after a warm-up call, as an op runs
    step after step in training (allocator and caches warm), and the variants
    take turns in PASSES blocks (A B C, A B C), so a slow spell of the
    machine does not fall on one variant only.
    """
    return [statistics.median(spent) for spent in time_calls(runs, timed_calls(repeats) // PASSES, device)]


def time_calls(runs: List[Callable[[], object]], per_pass: int, device: torch.device) -> List[List[float]]:
    """Seconds of each timed call per run: PASSES blocks of one warm-up call then ``per_pass`` timed calls, runs taking turns."""
    times: List[List[float]] = [[] for _ in runs]
    for _ in range(PASSES):
        for run, spent in zip(runs, times):
            run()
            _sync(device)
            for _ in range(per_pass):
                start = time.perf_counter()
                run()
                _sync(device)
                spent.append(time.perf_counter() - start)
    return times


def _bytes(tensors: List[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_in_process(run: Run, device: torch.device) -> int:
    """Peak extra bytes of one call of ``run`` (see the module docstring)."""
    run()  # warm-up: thread pools and BLAS buffers are not the op's
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        results = run()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before - _bytes(results)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    before = _proc_status("VmRSS")
    results = run()
    return max(0, _proc_status("VmHWM") - before - _bytes(results))


def peak_extra(case_name: str, variant: str, size_name: str, device: torch.device) -> Optional[int]:
    """Peak extra memory of one variant; on the CPU measured in a fresh process."""
    if device.type == "cuda":
        case = CASES[case_name](SIZES[size_name], device)
        return peak_extra_in_process(next(v.run for v in case.variants if v.name == variant), device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, "-m", "giblet.bench", "--probe", case_name, variant, size_name]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(command[3:])} failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


@dataclass
class Row:
    case: str
    description: str
    variant: str
    median_s: float
    peak_extra_bytes: Optional[int]


def run_benchmarks(
    size_name: str = "sherlock",
    device: str = "cpu",
    repeats: int = 7,
    cases: Optional[List[str]] = None,
    memory: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    dev = torch.device(device)
    rows = []
    for name in cases or list(CASES):
        if name not in CASES:
            raise ValueError(f"unknown benchmark case {name!r}; expected one of {', '.join(CASES)}")
        case = CASES[name](SIZES[size_name], dev)
        if progress:
            progress(f"{name}: timing")
        medians = time_medians([variant.run for variant in case.variants], dev, repeats)
        for variant, seconds in zip(case.variants, medians):
            if progress and memory:
                progress(f"{name}: memory of {variant.name}")
            extra = peak_extra(name, variant.name, size_name, dev) if memory and variant.measure_memory else None
            rows.append(Row(name, case.description, variant.name, seconds, extra))
        del case
        gc.collect()
    return rows


# Targets of the native ops on a CPU at Sherlock's sizes, checked by `giblet bench --check`:
# (case, baseline, measure, bound, meaning).
TARGETS = [
    ("gather_project", "reference", "speedup", 1.3, "at least 1.3x faster than the reference"),
    ("gather_project", "reference", "memory", 1 / 8, "at most 1/8 of the reference's peak extra memory"),
    ("gather_project", "torch.mm", "speedup", 0.8, "at least 80% of the speed of torch.mm on pre-gathered input"),
    ("bottleneck[0% lesioned]", "F.linear*mask", "speedup", 1.0, "never slower than unfused F.linear + mask"),
    ("bottleneck[10% lesioned]", "F.linear*mask", "speedup", 1.05, "at least 1.05x faster with 10% lesioned"),
    ("resample_codes", "numpy loop", "speedup", 20.0, "at least 20x faster than a loop over TRs"),
]


def ratios(rows: List[Row]) -> Dict[tuple, dict]:
    """(case, baseline) -> giblet's speed-up and memory ratio against that baseline."""
    fused = {r.case: r for r in rows if r.variant == "giblet"}
    found = {}
    for row in rows:
        if row.variant == "giblet":
            continue
        base = fused[row.case]
        memory_ratio = None
        if row.peak_extra_bytes and base.peak_extra_bytes is not None:
            memory_ratio = base.peak_extra_bytes / row.peak_extra_bytes
        found[(row.case, row.variant)] = {"speedup": row.median_s / base.median_s, "memory": memory_ratio}
    return found


@dataclass
class TargetCheck:
    case: str
    meaning: str
    measure: str  # speedup or memory
    value: float
    met: bool


def check_targets(rows: List[Row], size_name: str, device: str) -> List[TargetCheck]:
    """The ``TARGETS`` that ``rows`` measured (CPU, Sherlock sizes only; none otherwise), each met or missed."""
    if device != "cpu" or size_name != "sherlock":
        return []
    found, checks = ratios(rows), []
    for case_name, baseline, measure, bound, meaning in TARGETS:
        value = found.get((case_name, baseline), {}).get(measure)
        if value is None:
            continue
        checks.append(TargetCheck(case_name, meaning, measure, value, value <= bound if measure == "memory" else value >= bound))
    return checks


def probe(case_name: str, variant: str, size_name: str) -> None:
    """Print the peak extra memory of one variant as JSON (run by ``peak_extra`` in a fresh process)."""
    torch.manual_seed(0)
    case = CASES[case_name](SIZES[size_name], torch.device("cpu"))
    run = next(v.run for v in case.variants if v.name == variant)
    print(json.dumps({"peak_extra_bytes": peak_extra_in_process(run, torch.device("cpu"))}))

