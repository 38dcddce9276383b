"""`giblet bench`: the native ops against their baselines, the model's training step, and reading a store's batches.

The cases are in ``giblet.bench``: ``ops`` (one case per op and setting), ``train_step``, ``data``, ``lesion_atlas`` and
``mel_inversion``.
`giblet data bench STORE` is the ``data`` case under the data commands.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli.common import console, fail_cleanly

OPS_CASE = "ops"  # every op case
TRAIN_CASE = "train_step"
DATA_CASE = "data"
LESION_CASE = "lesion_atlas"
MEL_CASE = "mel_inversion"


class BenchSize(str, Enum):
    sherlock = "sherlock"
    small = "small"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@fail_cleanly
def bench(
    size: BenchSize = typer.Option(BenchSize.sherlock, help="Problem sizes: the Sherlock dataset's, or small ones."),
    device: Device = typer.Option(Device.cpu, help="Where the ops run."),
    repeats: int = typer.Option(8, min=1, help="Timed calls per variant (rounded up to an even number); the median is reported."),
    case: Optional[List[str]] = typer.Option(
        None, help=f"Only these cases (repeatable): an op case or {OPS_CASE} for all of them, {TRAIN_CASE} for the model's "
                   f"training step, {DATA_CASE} for reading batches from --store, {LESION_CASE} for the atlas lesion sweep against separate "
                   f"--roi runs on --store, {MEL_CASE} for turning a store's mel back into sound; default: {OPS_CASE} and {TRAIN_CASE}."
    ),
    memory: bool = typer.Option(True, help="Measure peak extra memory (CPU: one fresh process per variant)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows and ratios as JSON here."),
    check: bool = typer.Option(
        False, help="Exit 1 if a CPU target is missed (op targets are for sherlock sizes) or the native training step is not faster."
    ),
    train_steps: int = typer.Option(
        6, min=1, help=f"{TRAIN_CASE}: timed optimizer steps per variant (rounded up to an even number); the median is reported."
    ),
    train_batch: Optional[int] = typer.Option(None, min=1, help=f"{TRAIN_CASE}: windows per step (default: train.batch_size, 16)."),
    train_config: Optional[Path] = typer.Option(
        None, "--train-config", help=f"{TRAIN_CASE}: YAML settings of the model, loss and optimizer (default: the defaults, as `giblet train`)."
    ),
    store: Optional[Path] = typer.Option(
        None, "--store", help=f"{TRAIN_CASE}: take the batch from this prepared store (default: synthetic data at the tiny preset's sizes); "
                              f"{DATA_CASE}: the store to read."
    ),
    train_threads: Optional[int] = typer.Option(
        None, min=1, help=f"{TRAIN_CASE}: torch threads (default: every CPU this process may use; on a busy machine "
                          "use 1, or set OMP_WAIT_POLICY=PASSIVE, or threads spinning at each parallel region dominate)."
    ),
    data_batch: int = typer.Option(16, min=1, help=f"{DATA_CASE}: windows per batch."),
    data_repeats: int = typer.Option(100, min=1, help=f"{DATA_CASE}: timed batches per reading case."),
    lesion_parcels: int = typer.Option(150, min=1, help=f"{LESION_CASE}: about this many cube parcels."),
    lesion_permutations: int = typer.Option(39, min=0, help=f"{LESION_CASE}: random parcels per null."),
) -> None:
    """Time the native ops against their baselines (forward + backward, median) and measure peak extra memory;
    time the model's training step (TRs/s) with the native ops and with the references swapped in;
    with --case data, time reading random batches of windows from a prepared store."""
    import torch

    from giblet import ops
    from giblet.bench.ops import CASES, SIZES, check_targets, ratios, run_benchmarks

    size, device = size.value, device.value
    assert set(SIZES) == {s.value for s in BenchSize}
    groups = (OPS_CASE, TRAIN_CASE, DATA_CASE, LESION_CASE, MEL_CASE)
    unknown = [name for name in case or [] if name not in CASES and name not in groups]
    if unknown:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))}; expected one of {', '.join([*CASES, *groups])}", param_hint="--case")
    chosen = case or [OPS_CASE, TRAIN_CASE]
    op_cases = list(CASES) if OPS_CASE in chosen else [name for name in chosen if name in CASES]
    train, data, lesions = TRAIN_CASE in chosen, DATA_CASE in chosen, LESION_CASE in chosen
    for needs_store, name in ((data, DATA_CASE), (lesions, LESION_CASE)):
        if needs_store and store is None:
            raise typer.BadParameter(f"--case {name} reads a prepared store: name it with --store", param_hint="--case")
    if (op_cases or train) and device == "cuda" and not (torch.cuda.is_available() and ops.build_info()["cuda_kernels"]):
        console.print("[red]--device cuda needs a visible GPU and a build with CUDA kernels (see `giblet validate`)[/red]")
        raise typer.Exit(1)
    info = ops.build_info()
    where = info["device_name"] if device == "cuda" else f"CPU ({info['cpu_capability']}, {info['threads']} threads)"
    rows = []
    if op_cases:
        with console.status("benchmarking") as status:
            rows = run_benchmarks(size, device, repeats, op_cases, memory, progress=lambda text: status.update(f"benchmarking {text}"))
        _print_op_table(rows, size, where, info["torch"], repeats)
    missed = []
    for target in check_targets(rows, size, device):
        shown = f"{target.value:.3f}" if target.measure == "memory" else f"{target.value:.2f}x"
        console.print(f"  {'[green]met[/green]   ' if target.met else '[red]missed[/red]'} {escape(target.case)}: {target.meaning} ({shown})")
        if not target.met:
            missed.append(f"{target.case}: {target.meaning}")
    train_result = None
    if train:
        train_result = _bench_train_step(device, train_steps, train_batch, train_config, store, train_threads)
        if device == "cpu" and train_result.speedup <= 1.0:
            missed.append(f"{TRAIN_CASE}: the training step with the native ops is faster than with the references")
    data_result = run_data_bench(store, data_batch, data_repeats) if data else None
    lesion_result = _bench_lesion_atlas(store, train_config, lesion_parcels, lesion_permutations) if lesions else None
    mel_result = _bench_mel_inversion() if MEL_CASE in chosen else None
    if json_out:
        payload = {
            "size": size,
            "device": where,
            "torch": info["torch"],
            "repeats": repeats,
            "rows": [r.__dict__ for r in rows],
            "ratios": [{"case": c, "baseline": b, **v} for (c, b), v in ratios(rows).items()],
            "train_step": None if train_result is None else train_result.to_dict(),
            "data": data_result,
            "lesion_atlas": lesion_result,
            "mel_inversion": mel_result,
            "missed_targets": missed,
        }
        json_out.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {json_out}")
    if check and missed:
        raise typer.Exit(1)


def _mb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _print_op_table(rows, size: str, where: str, torch_version: str, repeats: int) -> None:
    from giblet.bench.ops import ratios, timed_calls

    table = Table(title=f"giblet bench: {size} sizes on {where}, torch {torch_version}, median of {timed_calls(repeats)} calls")
    for column in ("case", "variant", "median ms", "giblet speed-up", "peak extra MB", "giblet memory ratio"):
        table.add_column(column, justify="right" if column not in ("case", "variant") else "left")
    fused = {r.case: r for r in rows if r.variant == "giblet"}
    found = ratios(rows)
    for row in rows:
        ratio = found.get((row.case, row.variant), {})
        speedup, memory_ratio = ratio.get("speedup"), ratio.get("memory")
        table.add_row(
            escape(row.case) if row.variant == "giblet" else "",
            row.variant,
            f"{row.median_s * 1e3:,.2f}",
            "" if speedup is None else f"{speedup:.2f}x",
            _mb(row.peak_extra_bytes),
            "" if memory_ratio is None else f"{memory_ratio:.3f}",
        )
    console.print(table)
    for case_name in {r.case: r for r in rows}:
        console.print(f"  {escape(case_name)}: {fused[case_name].description}")


def _bench_train_step(device: str, steps: int, batch: Optional[int], config_path: Optional[Path], store_path: Optional[Path],
                      threads: Optional[int]):
    """Time the training step with the native ops and with the references; print the "training step" table."""
    from giblet.bench.train_step import VariantsDisagree, run_train_bench
    from giblet.config import load_config
    from giblet.data.store import open_store

    settings = load_config(config_path)
    store = None if store_path is None else open_store(store_path)
    with console.status(f"benchmarking {TRAIN_CASE}") as status:
        try:
            result = run_train_bench(steps, batch, store, settings, device, threads,
                                     progress=lambda text: status.update(f"benchmarking {text}"))
        except VariantsDisagree as error:
            console.print(f"[red]{TRAIN_CASE}: the two variants disagree, nothing timed:[/red] {escape(str(error))}")
            raise typer.Exit(1) from None
    threads = f"{result.threads} thread{'' if result.threads == 1 else 's'}"
    policy = f", OMP_WAIT_POLICY={result.omp_wait_policy}" if result.omp_wait_policy else ""
    where = f"CPU, {threads}{policy}, load {result.load_average[0]:.1f}" if device == "cpu" else device
    table = Table(title=f"training step: {where}, batch {result.batch_size}, median of {result.steps} steps")
    for column in ("variant", "median ms/step", "TRs/s", "giblet speed-up"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in result.rows:
        table.add_row(row.variant, f"{row.median_s * 1e3:,.1f}", f"{row.trs_per_s:,.2f}",
                      "" if row.variant == "giblet" else f"{result.speedup:.2f}x")
    console.print(table)
    agreement = result.agreement
    console.print(f"  forward, loss, backward, gradient clipping, AdamW step; {result.n_parameters:,} parameters; "
                  f"{escape(result.description)}")
    console.print(f"  same batch, same draws: loss {agreement.loss_giblet:.6g} (giblet) vs {agreement.loss_reference:.6g} "
                  f"(reference), gradients within {agreement.grad_rel_diff:.1e} of their largest value")
    if device == "cpu":
        ok = result.speedup > 1.0
        console.print(f"  {'[green]met[/green]   ' if ok else '[red]missed[/red]'} {TRAIN_CASE}: "
                      f"the native ops train faster than the references ({result.speedup:.2f}x)")
    return result


def run_data_bench(store_path: Path, batch: int, repeats: int) -> dict:
    """Time reading random batches of windows from a store (warm page cache); print the table (`giblet bench --case data`,
    `giblet data bench`). Returns the store, the batch size and each reading case's median / p95 / max ms."""
    from giblet.bench.data import batch_read_times
    from giblet.data.store import directory_size, open_store

    opened = open_store(store_path)
    with console.status(f"benchmarking {DATA_CASE}"):
        results = batch_read_times(opened, batch, repeats)
    table = Table(title=f"reading batches of {batch} random windows from {escape(str(store_path))} "
                        f"({directory_size(store_path) / 2**30:.2f} GiB)")
    for column in ("case", "median ms", "p95 ms", "max ms"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, row in results.items():
        table.add_row(name, f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['max_ms']:.2f}")
    console.print(table)
    return {"store": str(store_path), "batch_size": batch, "repeats": repeats, "cases": results}


def _bench_lesion_atlas(store_path: Path, config_path: Optional[Path], parcels: int, permutations: int) -> dict:
    """Time the atlas sweep against separate --roi runs; print the table."""
    from giblet.bench.lesion import lesion_atlas_times
    from giblet.config import load_config
    from giblet.data.store import open_store

    with console.status(f"benchmarking {LESION_CASE}"):
        result = lesion_atlas_times(open_store(store_path), load_config(config_path), parcels, permutations)
    table = Table(title=f"lesion atlas: {result['voxels']:,} voxels, {result['parcels']} cube parcels (edge {result['cube_edge']}, "
                        f"median {result['median_parcel_voxels']:.0f} voxels), {result['windows']} test windows, "
                        f"{permutations} random parcels per null")
    for column in ("variant", "seconds", "seconds per parcel", "speed-up per parcel"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row(f"--atlas sweep ({result['null_classes']} null classes)", f"{result['sweep_s']:.1f}",
                  f"{result['sweep_s_per_parcel']:.3f}", f"{result['speedup_per_parcel']:.1f}x")
    table.add_row(f"--roi runs (median of {result['roi_runs']})", f"{result['roi_runs_s_for_all_parcels']:.1f} (all parcels)",
                  f"{result['roi_s_per_parcel']:.3f}", "")
    console.print(table)
    return result


def _bench_mel_inversion() -> dict:
    """Score and time the lesion report's mel-to-sound round trip on a synthetic clip; print the table."""
    from giblet.bench.audio import mel_inversion

    with console.status(f"benchmarking {MEL_CASE}"):
        result = mel_inversion()
    table = Table(title=f"mel to sound: {result['clip_seconds']:g} s synthetic clip at {result['rate']} Hz, {result['n_mels']} mels, "
                        f"rebuilt at {result['sound_rate']} Hz, median of {result['repeats']}")
    for column in ("sound", "spectral convergence (mel magnitude)", "median s"):
        table.add_column(column, justify="left" if column == "sound" else "right")
    table.add_row("rebuilt (librosa mel_to_stft + griffinlim)", f"{result['spectral_convergence']:.4f}", f"{result['median_s']:.2f}")
    table.add_row("silence", f"{result['silence_spectral_convergence']:.4f}", "")
    table.add_row("white noise", f"{result['noise_spectral_convergence']:.4f}", "")
    console.print(table)
    return result
