"""The training-step benchmark (giblet.bench.train_step): the reference swap, the agreement of both variants,
`giblet bench --case train_step`; and the store-reading one, `giblet bench --case data` / `giblet data bench`.

Nothing here asserts on speed (timings on a shared machine are noise); the
speed-up is what `giblet bench` and benchmarks/test_train_step.py measure.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from giblet import ops, ops_reference
from giblet.bench import train_step as bench_train
from giblet.bench.train_step import (
    REFERENCE_OPS, VariantsDisagree, build_trainees, check_agreement, loss_and_gradients, num_threads, reference_ops,
    run_train_bench, synthetic_data,
)
from giblet.config import from_dict
from giblet.models import autoencoder
from giblet_cli.main import app

runner = CliRunner()

# Narrow layers, the tiny preset's data sizes: a step takes a fraction of a second.
SMALL_MODEL = dict(
    frame_features=16, modality_width=32, hidden=[64, 48, 64],
    slot_features=16,
)
SMALL_YAML = "model:\n" + "".join(f"  {key}: {value}\n" for key, value in SMALL_MODEL.items())


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy machine, threads that wait for each other at every parallel region cost most."""
    with num_threads(1):
        yield


def small_config(**sections):
    return from_dict({"model": SMALL_MODEL, **sections}, "test settings")


def test_reference_ops_swaps_the_models_ops_and_restores_them():
    assert autoencoder.ops is ops
    with reference_ops():
        assert autoencoder.ops is REFERENCE_OPS
        assert autoencoder.ops.gather_project is ops_reference.gather_project
    assert autoencoder.ops is ops
    with pytest.raises(RuntimeError, match="inside"):
        with reference_ops():
            raise RuntimeError("inside")
    assert autoencoder.ops is ops, "an error inside the block must not leave the references in place"


def test_reference_namespace_covers_every_op_the_model_calls():
    source = open(autoencoder.__file__).read()
    called = {name for name in ("gather_project", "grid_index", "resample_codes", "grid_average", "bottleneck")
              if f"ops.{name}(" in source}
    assert called, "the model calls no native op by the module name `ops`: the swap would change nothing"
    assert all(hasattr(REFERENCE_OPS, name) for name in called)


def test_synthetic_data_has_the_tiny_presets_sizes():
    config = small_config()
    data = synthetic_data(config, batch_size=5)
    dims, batch = data.dims, data.batch
    height, width = config.video.height, config.video.width  # the frames a store prepared with these settings holds
    assert dims.n_voxels == 4000 and (dims.frame_height, dims.frame_width) == (height, width)
    assert dims.window_s == pytest.approx(config.window.lookback_s + 1.5)
    assert dims.present("mel") and not dims.present("codes")
    assert batch["fmri"].shape == (5, 4000) and batch["window_onset"].dtype == torch.float64
    assert batch["video_index"].shape == (5, config.window.video_slots)
    assert batch["text_index"].shape == (5, config.window.text_slots)
    # The frame table holds exactly the frames the windows show.
    shown = batch["video_index"][batch["video_index"] >= 0]
    assert int(shown.max()) + 1 == data.stimuli.frames.shape[0] == torch.unique(shown).numel()
    assert data.stimuli.frames.shape[1] == width * height * 3 and data.stimuli.frames.dtype == torch.uint8


@pytest.mark.parametrize("features", [["mel"], ["codes"]], ids=["mel", "codes"])
def test_both_variants_give_the_same_loss_and_gradients(features):
    config = small_config(audio={"features": features})
    data = synthetic_data(config, batch_size=4)
    trainee = build_trainees(data, config, torch.device("cpu"))["giblet"]
    agreement = check_agreement(trainee)
    assert agreement.loss_giblet == pytest.approx(agreement.loss_reference, rel=bench_train.LOSS_RTOL)
    assert agreement.grad_rel_diff <= bench_train.GRAD_RTOL
    audio, other = ("codes", "mel") if features == ["codes"] else ("mel", "codes")
    # Every reconstruction term, the fMRI term and the settings' other fMRI terms (correlation, per-modality readouts).
    assert {"fmri", "frames", audio, "text"} <= set(agreement.parts) and other not in agreement.parts
    # And directly, parameter by parameter, with the dropout draws fixed.
    loss_a, _, grads_a = loss_and_gradients(trainee, "giblet", seed=3)
    loss_b, _, grads_b = loss_and_gradients(trainee, "reference", seed=3)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert set(grads_a) == set(grads_b) == {name for name, _ in trainee.model.named_parameters()}
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()) + 1e-12, msg=name)


def test_a_wrong_reference_is_caught_before_any_timing(monkeypatch):
    def shifted(*args, **kwargs):
        return ops_reference.gather_project(*args, **kwargs) + 0.5

    monkeypatch.setattr(REFERENCE_OPS, "gather_project", shifted)
    timed = []
    monkeypatch.setattr(bench_train, "time_steps", lambda *args: timed.append(args) or [[1.0], [1.0]])
    with pytest.raises(VariantsDisagree, match="loss differs"):
        run_train_bench(repeats=2, batch_size=3, config=small_config(), threads=1)
    assert not timed


def test_a_wrong_gradient_is_caught(monkeypatch):
    class ScaledBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def wrong_gradient(table, index, weight, bias=None, scale=1.0, shift=0.0):
        return ScaledBackward.apply(ops_reference.gather_project(table, index, weight, bias, scale, shift))

    monkeypatch.setattr(REFERENCE_OPS, "gather_project", wrong_gradient)
    config = small_config()
    trainee = build_trainees(synthetic_data(config, batch_size=3), config, torch.device("cpu"))["giblet"]
    with pytest.raises(VariantsDisagree, match="gradient of l1_"):
        check_agreement(trainee)


def test_run_train_bench_reports_both_variants():
    result = run_train_bench(repeats=2, batch_size=3, config=small_config(), threads=1)
    assert [row.variant for row in result.rows] == ["giblet", "reference"]
    assert result.threads == 1 and result.batch_size == 3 and result.steps == 2
    for row in result.rows:
        assert len(row.step_s) == 2 and row.median_s > 0
        assert row.trs_per_s == pytest.approx(3 / row.median_s)
    assert result.speedup == pytest.approx(result.rows[1].median_s / result.rows[0].median_s)
    assert torch.get_num_threads() == 1, "the thread count is restored afterwards"


def test_num_threads_defaults_to_every_usable_cpu_and_restores():
    import os

    before = torch.get_num_threads()
    with num_threads(None) as used:
        assert used == torch.get_num_threads() == len(os.sched_getaffinity(0))
    with num_threads(3) as used:
        assert used == 3
    assert torch.get_num_threads() == before


def test_cli_prints_and_writes_the_training_step(tmp_path):
    settings = tmp_path / "small.yaml"
    settings.write_text(SMALL_YAML)
    out = tmp_path / "bench.json"
    args = ["bench", "--case", "train_step", "--train-steps", "2", "--train-batch", "2", "--train-config", str(settings),
            "--train-threads", "1", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training step" in result.output and "TRs/s" in result.output
    lines = result.output.splitlines()
    assert any("giblet" in line and "│" in line for line in lines) and any("reference" in line and "│" in line for line in lines)
    assert "giblet bench: " not in result.output, "only the training step was asked for"
    report = json.loads(out.read_text())
    assert report["rows"] == []
    step = report["train_step"]
    assert step["batch_size"] == 2 and step["steps"] == 2 and step["threads"] == 1 and len(step["load_average"]) == 3
    assert "omp_wait_policy" in step
    assert [row["variant"] for row in step["rows"]] == ["giblet", "reference"]
    for row in step["rows"]:
        assert row["median_s"] > 0 and row["trs_per_s"] == pytest.approx(2 / row["median_s"])
    assert step["speedup"] == pytest.approx(step["rows"][1]["median_s"] / step["rows"][0]["median_s"])
    assert abs(step["agreement"]["loss_giblet"] - step["agreement"]["loss_reference"]) <= 1e-4 * abs(step["agreement"]["loss_giblet"])
    assert "synthetic tiny-preset data" in step["description"]
    missed = [m for m in report["missed_targets"] if m.startswith("train_step")]
    assert bool(missed) == (step["speedup"] <= 1.0)


def test_cli_check_fails_when_the_native_step_is_not_faster(tmp_path, monkeypatch):
    settings = tmp_path / "small.yaml"
    settings.write_text(SMALL_YAML)
    # The reference steps made to look twice as fast: the check must fail.
    monkeypatch.setattr(bench_train, "time_steps", lambda runs, steps, device: [[0.2] * 2, [0.1] * 2])
    args = ["bench", "--case", "train_step", "--train-steps", "2", "--train-batch", "2", "--train-config", str(settings), "--check",
            "--train-threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "missed" in result.output and "0.50x" in result.output


def test_cli_reports_disagreeing_variants(tmp_path, monkeypatch):
    settings = tmp_path / "small.yaml"
    settings.write_text(SMALL_YAML)
    monkeypatch.setattr(REFERENCE_OPS, "gather_project", lambda *args, **kwargs: ops_reference.gather_project(*args, **kwargs) * 2)
    args = ["bench", "--case", "train_step", "--train-steps", "2", "--train-batch", "2", "--train-config", str(settings),
            "--train-threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "disagree" in result.output and "nothing timed" in result.output


def test_cli_rejects_an_unknown_case():
    result = runner.invoke(app, ["bench", "--case", "train-step"])
    assert result.exit_code == 2
    assert "train_step" in result.output


def test_cli_reports_a_missing_store_cleanly(tmp_path):
    result = runner.invoke(app, ["bench", "--case", "train_step", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "manifest.json" in result.output


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory):
    """A prepared store of a minute and a half of synthetic movie, 300 voxels (the session's tiny store takes minutes)."""
    from giblet.data.store import prepare
    from giblet.data.synth import SynthPreset, synthesize

    preset = SynthPreset("mini", n_subjects=2, tr_s=1.5, movie_duration_s=90.0, scan_trs=60, frame_width=160, frame_height=90,
                         grid_shape=(10, 12, 10), mask_voxels=300, n_regions=6, fmri_dtype="float32", noise_maps=4)
    data = synthesize(tmp_path_factory.mktemp("synth") / "mini", preset, seed=0, progress=False)
    settings = from_dict({"window": {"lookback_s": 8.0, "hrf_length_s": 20.0}}, "test settings")
    return prepare(data, settings, tmp_path_factory.mktemp("stores") / "mini", progress=False)


def test_a_prepared_store_gives_the_batch(mini_store, tmp_path):
    settings = tmp_path / "small.yaml"
    settings.write_text(SMALL_YAML)
    out = tmp_path / "bench.json"
    args = ["bench", "--case", "train_step", "--train-steps", "2", "--train-batch", "3", "--train-config", str(settings),
            "--store", str(mini_store.path), "--train-threads", "1", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    step = json.loads(out.read_text())["train_step"]
    assert step["description"].startswith(f"store {mini_store.path}") and step["threads"] == 1
    assert f"{mini_store.n_voxels} voxels" in step["description"]
    assert "1 thread," in result.output


def test_the_data_case_reads_the_store_as_giblet_data_bench_does(mini_store, tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--case", "data", "--store", str(mini_store.path), "--data-batch", "4",
                                 "--data-repeats", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "reading batches of 4 random windows" in result.output
    assert "giblet bench: " not in result.output and "training step" not in result.output, "only the data case was asked for"
    report = json.loads(out.read_text())
    assert report["rows"] == [] and report["train_step"] is None
    data = report["data"]
    assert data["batch_size"] == 4 and data["repeats"] == 3 and data["store"] == str(mini_store.path)
    assert set(data["cases"]) == {"cross_subject: indices + fMRI", "per_subject: indices + fMRI", "cross_subject: + frames copied"}
    for row in data["cases"].values():
        assert 0 < row["median_ms"] <= row["p95_ms"] <= row["max_ms"]
    same = runner.invoke(app, ["data", "bench", str(mini_store.path), "--batch", "4", "--repeats", "3"])
    assert same.exit_code == 0, same.output
    assert "reading batches of 4 random windows" in same.output and "per_subject: indices + fMRI" in same.output
