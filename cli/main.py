"""The ``giblet`` command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli import cluster as cluster_commands
from giblet_cli import data as data_commands
from giblet_cli.demo import demo as demo_command
from giblet_cli.train import train as train_command
from giblet_cli.common import console, fail_cleanly

app = typer.Typer(
    name="giblet",
    help="Learn how each part of the brain sees a movie: a multimodal autoencoder whose layer 7 is the fMRI response.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
def _print_version(value: bool) -> None:
    if value:
        import giblet

        console.print(f"giblet {giblet.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Learn how each part of the brain sees a movie: a multimodal autoencoder whose layer 7 is the fMRI response."""


# Targets of the native ops on a CPU, checked by `giblet bench --check`:
# (case, baseline, measure, bound, meaning).
TARGETS = [
    ("gather_project", "reference", "speedup", 1.3, "at least 1.3x faster than the reference"),
    ("gather_project", "reference", "memory", 1 / 8, "at most 1/8 of the reference's peak extra memory"),
    ("gather_project", "torch.mm", "speedup", 0.8, "at least 80% of the speed of torch.mm on pre-gathered input"),
    ("bottleneck[0% lesioned]", "F.linear*mask", "speedup", 1.0, "never slower than unfused F.linear + mask"),
    ("bottleneck[10% lesioned]", "F.linear*mask", "speedup", 1.05, "at least 1.05x faster with 10% lesioned"),
    ("resample_codes", "numpy loop", "speedup", 20.0, "at least 20x faster than a loop over TRs"),
]


def _build_table(info: dict) -> Table:
    table = Table(title="giblet build", show_header=False)
    table.add_row("extension", info["extension"])
    table.add_row("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    table.add_row("CPU kernels", "yes" if info["cpu_kernels"] else "NO")
    table.add_row("CUDA kernels", "yes" if info["cuda_kernels"] else "no (CPU-only build)")
    gpu = info["device_name"] or "none visible"
    table.add_row("GPU", gpu)
    table.add_row("CPU", f"{info['cpu_capability']}, {info['threads']} threads")
    return table


app.add_typer(data_commands.app, name="data")
app.add_typer(cluster_commands.app, name="cluster")
app.command(name="train")(train_command)
app.command(name="demo")(demo_command)


class Baseline(str, Enum):
    ridge = "ridge"
    none = "none"


@app.command()
@fail_cleanly
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint is scored)."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
    split: str = typer.Option("test", help="Held-out split to score: test or val."),
    baseline: Baseline = typer.Option(Baseline.ridge, help="Also fit and score a baseline on the same split."),
) -> None:
    """Per-voxel r over the held-out TRs (group mean and each subject), noise ceilings, a ridge baseline, maps."""
    from giblet.eval.evaluate import evaluate as run_evaluation

    if split not in ("test", "val"):
        raise typer.BadParameter(f"{split!r}; expected test or val", param_hint="--split")
    metrics = run_evaluation(run, store, None if baseline is Baseline.none else baseline.value, split)
    print_metrics(metrics, run, split)


def print_metrics(metrics: dict, run: Path, split: str) -> None:
    """The table of `giblet evaluate` (also printed by `giblet demo`)."""
    table = Table(title=f"giblet evaluate {escape(str(run))}: {split} TRs {metrics['test_trs'][0]}-{metrics['test_trs'][1] - 1}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_voxels", "mean_r", "median_r", "mean_r_subject", "noise_ceiling_mean", "noise_normalized_r"):
        value = metrics[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for name, values in metrics["baselines"].items():
        table.add_row(f"baseline {name}: mean_r", f"{values['mean_r']:.4f}")
    truth = metrics.get("truth")
    if truth and "skipped" not in truth:
        table.add_row("truth: signal voxels", str(truth["signal_voxels"]))
        table.add_row("truth: r of the noise-free signal (ceiling)", f"{truth['true_signal_r']:.4f}")
        for name in ("model", "ridge", "ridge_hrf", "ridge_banded"):
            if name in truth:
                table.add_row(f"truth: {name} mean_r on signal voxels", f"{truth[name]['mean_r']:.4f}")
                table.add_row(f"truth: {name} fraction of the ceiling", f"{truth[name]['fraction_of_ceiling']:.3f}")
                if "r_vs_signal" in truth[name]:
                    table.add_row(f"truth: {name} r against the noise-free signal", f"{truth[name]['r_vs_signal']:.3f}")
        per_subject = truth.get("per_subject")
        if per_subject:
            table.add_row("truth: model per-subject r / leave-one-out ceiling, signal voxels",
                          f"{per_subject['model_over_noise_ceiling']:.3f}")
            table.add_row("truth: noise-free signal per-subject r / that ceiling", f"{per_subject['noise_free_signal_over_noise_ceiling']:.3f}")
        for kind, entry in truth.get("by_kind", {}).items():
            names = [name for name in ("model", "ridge", "ridge_hrf", "ridge_banded") if name in entry]
            fractions = " / ".join(f"{entry[name]['fraction_of_ceiling']:.3f}" for name in names)
            table.add_row(f"truth: {kind} ({entry['voxels']} voxels) fraction, {' / '.join(names)}", fractions)
    console.print(table)
    console.print(f"maps and plots in {escape(str(Path(run) / 'eval'))}: r_map.nii.gz, prediction_{split}.nii.gz, r_map.png, r_histogram.png")


@app.command()
@fail_cleanly
def validate(
    data: Optional[Path] = typer.Option(None, "--data", help="Also check this Sherlock-layout folder: files, times, TRs, voxels."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration (checked for unknown keys too)."),
    quick: bool = typer.Option(False, help="With --data: read headers only, not every fMRI volume, and load no models."),
) -> None:
    """Check giblet before spending GPU time: the native build, every op against its reference, and the data."""
    from giblet import ops
    from giblet.config import load_config
    from giblet.validate import check_ops

    settings = load_config(config)

    console.print(_build_table(ops.build_info()))
    checks = check_ops()
    table = Table(title="native ops vs reference (forward and backward)")
    for column in ("op", "device", "max |error|", "tolerance", "result"):
        table.add_column(column)
    for check in checks:
        verdict = "[green]PASS[/green]" if check.passed else "[red]FAIL[/red]"
        table.add_row(check.op, check.device, f"{check.max_error:.2e}", f"{check.tolerance:.0e}", verdict)
    console.print(table)
    failed = [f"{c.op} on {c.device}" for c in checks if not c.passed]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} op checks failed[/red]: " + ", ".join(failed))
    else:
        console.print(f"[green]all {len(checks)} op checks passed[/green]")
    if data is not None:
        failed += _validate_data(data, settings, quick)
    if failed:
        raise typer.Exit(1)


def print_layer_table(model, title: str) -> None:
    table = Table(title=title)
    for column in ("layer", "input", "output", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, shape_in, shape_out, n_params in model.layer_table():
        table.add_row(name, shape_in, shape_out, f"{n_params:,}")
    table.add_row("total", "", "", f"{model.n_parameters():,}")
    console.print(table)


def _validate_data(data: Path, settings, quick: bool) -> List[str]:
    from giblet.data.check import FAIL, PASS, check_data

    facts: dict = {}
    with console.status(f"checking {data}"):
        checks = check_data(data, settings, deep=not quick, load_models=not quick, facts=facts)
    table = Table(title=f"data: {escape(str(data))}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    colours = {PASS: "green", FAIL: "red"}
    for check in checks:
        colour = colours.get(check.status, "yellow")
        table.add_row(escape(check.name), f"[{colour}]{check.status}[/{colour}]", escape(check.detail))
    console.print(table)
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} data checks failed[/red]: " + ", ".join(failed))
    else:
        console.print(f"[green]all {len(checks)} data checks passed[/green]")
    if "dims" in facts:
        from giblet.models import GibletAutoencoder

        with __import__("torch").device("meta"):  # shapes and counts only: no memory for the weights
            model = GibletAutoencoder(facts["dims"], settings.model)
        print_layer_table(model, f"the model for {escape(str(data))} (batch of 1)")
    return failed


@app.command()
@fail_cleanly
def model(
    store: Optional[Path] = typer.Option(None, help="Size the model for this store; default: Sherlock's shapes."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration (model widths)."),
    embedding_size: int = typer.Option(384, help="Without --store: the text embedder's width (384 MiniLM, 1024 bge-large)."),
) -> None:
    """The 13 layers with their shapes and parameters, and the activation memory one training sample costs (CPU, float32)."""
    from giblet.config import load_config
    from giblet.models import GibletAutoencoder, dims_from_manifest
    from giblet.models.summary import activation_bytes_per_sample, sherlock_dims

    settings = load_config(config)
    if store is not None:
        from giblet.data.store import open_store

        dims, where = dims_from_manifest(open_store(store).manifest, settings.model.audio_input, settings.model.inputs), str(store)
    else:
        dims, where = sherlock_dims(embedding_size).restricted_to(settings.model.inputs), f"Sherlock's shapes ({embedding_size}-d text)"
    network = GibletAutoencoder(dims, settings.model)
    print_layer_table(network, f"giblet model for {escape(where)}")
    per_sample = activation_bytes_per_sample(network)
    state = network.n_parameters() * 4 * 4  # float32 weights, gradients and two AdamW moments
    console.print(f"parameters: {network.n_parameters():,} ({network.n_parameters() / 1e6:.1f} M)")
    console.print(f"activation memory per training sample (float32, saved for backward): {per_sample / 2**20:.2f} MiB")
    console.print(
        f"weights + gradients + AdamW state: {state / 2**30:.2f} GiB; with 32 samples of activations: "
        f"{(state + 32 * per_sample) / 2**30:.2f} GiB"
    )


def _mb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


class BenchSize(str, Enum):
    sherlock = "sherlock"
    small = "small"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


TRAIN_CASE = "train_step"


@app.command()
@fail_cleanly
def bench(
    size: BenchSize = typer.Option(BenchSize.sherlock, help="Problem sizes: the Sherlock dataset's, or small ones."),
    device: Device = typer.Option(Device.cpu, help="Where the ops run."),
    repeats: int = typer.Option(8, min=1, help="Timed calls per variant (rounded up to an even number); the median is reported."),
    case: Optional[List[str]] = typer.Option(
        None, help=f"Only these cases (repeatable): an op case, or {TRAIN_CASE} for the model's training step; default all."
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
        None, "--store", help=f"{TRAIN_CASE}: take the batch from this prepared store (default: synthetic data at the tiny preset's sizes)."
    ),
    train_threads: Optional[int] = typer.Option(
        None, min=1, help=f"{TRAIN_CASE}: torch threads (default: every CPU this process may use; on a busy machine "
                          "use 1, or set OMP_WAIT_POLICY=PASSIVE, or threads spinning at each parallel region dominate)."
    ),
) -> None:
    """Time the native ops against their baselines (forward + backward, median) and measure peak extra memory;
    time the model's training step (TRs/s) with the native ops and with the references swapped in."""
    import torch

    from giblet import ops
    from giblet.bench import CASES, SIZES, run_benchmarks

    size, device = size.value, device.value
    assert set(SIZES) == {s.value for s in BenchSize}
    unknown = [name for name in case or [] if name not in CASES and name != TRAIN_CASE]
    if unknown:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))}; expected one of {', '.join([*CASES, TRAIN_CASE])}", param_hint="--case")
    op_cases = [name for name in case if name != TRAIN_CASE] if case else list(CASES)
    train = not case or TRAIN_CASE in case
    if device == "cuda" and not (torch.cuda.is_available() and ops.build_info()["cuda_kernels"]):
        console.print("[red]--device cuda needs a visible GPU and a build with CUDA kernels (see `giblet validate`)[/red]")
        raise typer.Exit(1)
    info = ops.build_info()
    where = info["device_name"] if device == "cuda" else f"CPU ({info['cpu_capability']}, {info['threads']} threads)"
    rows = []
    if op_cases:
        with console.status("benchmarking") as status:
            rows = run_benchmarks(size, device, repeats, op_cases, memory, progress=lambda text: status.update(f"benchmarking {text}"))
        _print_op_table(rows, size, where, info["torch"], repeats)
    ratios, missed = _op_targets(rows, size, device)
    train_result = None
    if train:
        train_result = _bench_train_step(device, train_steps, train_batch, train_config, store, train_threads)
        if device == "cpu" and train_result.speedup <= 1.0:
            missed.append(f"{TRAIN_CASE}: the training step with the native ops is faster than with the references")
    if json_out:
        payload = {
            "size": size,
            "device": where,
            "torch": info["torch"],
            "repeats": repeats,
            "rows": [r.__dict__ for r in rows],
            "ratios": [{"case": c, "baseline": b, **v} for (c, b), v in ratios.items()],
            "train_step": None if train_result is None else train_result.to_dict(),
            "missed_targets": missed,
        }
        json_out.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {json_out}")
    if check and missed:
        raise typer.Exit(1)


def _print_op_table(rows, size: str, where: str, torch_version: str, repeats: int) -> None:
    from giblet.bench import timed_calls

    table = Table(title=f"giblet bench: {size} sizes on {where}, torch {torch_version}, median of {timed_calls(repeats)} calls")
    for column in ("case", "variant", "median ms", "giblet speed-up", "peak extra MB", "giblet memory ratio"):
        table.add_column(column, justify="right" if column not in ("case", "variant") else "left")
    fused = {r.case: r for r in rows if r.variant == "giblet"}
    ratios = _ratios(rows)
    for row in rows:
        ratio = ratios.get((row.case, row.variant), {})
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


def _ratios(rows) -> dict:
    """(case, baseline) -> giblet's speed-up and memory ratio against that baseline."""
    fused = {r.case: r for r in rows if r.variant == "giblet"}
    ratios = {}
    for row in rows:
        if row.variant == "giblet":
            continue
        base = fused[row.case]
        memory_ratio = None
        if row.peak_extra_bytes and base.peak_extra_bytes is not None:
            memory_ratio = base.peak_extra_bytes / row.peak_extra_bytes
        ratios[(row.case, row.variant)] = {"speedup": row.median_s / base.median_s, "memory": memory_ratio}
    return ratios


def _op_targets(rows, size: str, device: str):
    """The ratios, and the CPU targets missed (each printed as met or missed)."""
    ratios, missed = _ratios(rows), []
    if device == "cpu" and size == "sherlock":
        for case_name, baseline, measure, bound, meaning in TARGETS:
            value = ratios.get((case_name, baseline), {}).get(measure)
            if value is None:
                continue
            ok = value <= bound if measure == "memory" else value >= bound
            shown = f"{value:.3f}" if measure == "memory" else f"{value:.2f}x"
            console.print(f"  {'[green]met[/green]   ' if ok else '[red]missed[/red]'} {escape(case_name)}: {meaning} ({shown})")
            if not ok:
                missed.append(f"{case_name}: {meaning}")
    return ratios, missed


def _bench_train_step(device: str, steps: int, batch: Optional[int], config_path: Optional[Path], store_path: Optional[Path],
                      threads: Optional[int]):
    """Time the training step with the native ops and with the references; print the "training step" table."""
    from giblet.bench_train import VariantsDisagree, run_train_bench
    from giblet.config import load_config

    settings = load_config(config_path)
    store = None
    if store_path is not None:
        from giblet.data.store import open_store

        store = open_store(store_path)
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


@app.command()
@fail_cleanly
def lesion(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint) or a checkpoint file."),
    roi: Path = typer.Option(..., "--roi", help="ROI NIfTI on the store's grid: its non-zero voxels' layer-7 units are silenced."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/lesion/<roi name>)."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
    permutations: int = typer.Option(39, min=0, help="Random ROIs of the same size behind each p-value (the smallest p is 1 / (N + 1))."),
    split: str = typer.Option("test", help="Windows to reconstruct: test or val."),
    seed: int = typer.Option(0, help="Seed of the random ROIs."),
) -> None:
    """Reconstruct the held-out windows with and without an ROI's units: losses, p-values, frames, audio, nearest texts."""
    from giblet.eval.lesion import lesion as run_lesion

    if split not in ("test", "val"):
        raise typer.BadParameter(f"{split!r}; expected test or val", param_hint="--split")
    report = run_lesion(run, roi, out, store, permutations, split, seed)
    table = Table(title=f"giblet lesion {escape(str(run))}: {escape(roi.name)}, {report['roi_voxels']} voxels "
                        f"({report['lesioned_units']} of {report['n_units']} units), {split} TRs {report['trs'][0]}-{report['trs'][1] - 1}")
    for column in ("modality", "loss intact", "loss lesioned", "relative change", f"p ({permutations} random ROIs)"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for name, values in report["modalities"].items():
        shown = name if name != "audio" else f"audio ({report['audio_feature']})"
        p = "-" if values["p_value"] is None else f"{values['p_value']:.3f}"
        table.add_row(shown, f"{values['loss_intact']:.4f}", f"{values['loss_lesioned']:.4f}", f"{values['relative_change']:+.2%}", p)
    console.print(table)
    folder = Path(report["out"])
    console.print(f"report in {escape(str(folder))}:")
    for name, entry in report["files"].items():
        files = [entry["file"]] if "file" in entry else list(entry["files"].values())
        note = f" ({escape(entry['skipped'])})" if entry.get("skipped") else ""
        console.print(f"  {name}: {escape(', '.join(files) or 'none')}{note}")
    console.print("  lesion.json")


if __name__ == "__main__":
    app()
