"""Evaluation: per-voxel r over time, leave-one-subject-out noise ceilings, the baselines beside the model, maps.

The linear models themselves (the ridge baselines) are specified in test_linear.py.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from giblet.config import dump_config, from_dict
from giblet.eval.metrics import noise_ceiling, paired_difference, pearson_r
from giblet_cli.main import app

runner = CliRunner()


def test_r_is_per_voxel_over_time_not_across_voxels():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(40, 3))
    prediction = np.stack([target[:, 0], -target[:, 1], rng.normal(size=40)], axis=1)
    r = pearson_r(prediction, target)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and abs(r[2]) < 0.4
    assert pearson_r(np.ones((10, 1)), rng.normal(size=(10, 1)))[0] == 0.0  # constant: 0, not NaN


def test_noise_ceiling_is_the_leave_one_out_intersubject_correlation():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(500, 1))
    same = np.stack([signal] * 4)
    assert noise_ceiling(same)[0] == pytest.approx(1.0)
    noisy = signal[None] + rng.normal(size=(4, 500, 1))  # signal variance 1, noise variance 1
    # r(one subject, mean of 3 others) = 1 / sqrt(2 * (1 + 1/3)) for these variances.
    assert noise_ceiling(noisy)[0] == pytest.approx(1 / np.sqrt(2 * (1 + 1 / 3)), abs=0.05)
    assert abs(noise_ceiling(rng.normal(size=(4, 500, 1)))[0]) < 0.1


def _two_predictions(rng, error_first: float, error_second: float, trs: int = 60, voxels: int = 200):
    """A block of ``trs`` TRs: a stimulus-driven signal shared by the voxels, a measured series with noise smooth in
    time (as a haemodynamic series is), and two predictions: the signal plus errors of their own, as smooth."""
    from scipy.ndimage import gaussian_filter1d

    def smooth(size, sigma):
        return gaussian_filter1d(rng.normal(size=size), sigma, axis=0)

    signal = smooth((trs, 5), 2.0) @ rng.normal(size=(5, voxels))
    signal /= signal.std(axis=0)
    measured = signal + 2.0 * smooth((trs, voxels), 1.5)
    return (signal + 2.0 * error_first * smooth((trs, voxels), 2.0), signal + 2.0 * error_second * smooth((trs, voxels), 2.0),
            measured)


def test_the_lead_over_a_baseline_is_the_mean_r_difference_with_an_interval_that_covers_what_the_block_cannot_tell():
    rng = np.random.default_rng(3)
    first, second, measured = _two_predictions(rng, 0.6, 1.4)
    half = np.arange(200) < 100
    lead = paired_difference(first, second, measured, {"all": np.ones(200, dtype=bool), "half": half}, 8,
                             scales={"half": 0.5})
    difference = pearson_r(first, measured) - pearson_r(second, measured)
    assert lead["all"]["difference"] == pytest.approx(float(difference.mean()))
    assert lead["half"]["difference"] == pytest.approx(float(difference[half].mean()) / 0.5)
    assert lead["all"]["blocks"] == 7 and lead["all"]["block_trs"] == 8  # 60 TRs in 7 blocks of 8-9
    # Over many blocks: two equally good predictions get an interval that holds 0 about 95% of the time (3 spreads
    # of a binomial proportion of 40 below); a clearly better one gets an interval above 0 nearly always.
    equal = better = 0
    for draw in range(40):
        rng = np.random.default_rng(100 + draw)
        low, high = paired_difference(*_two_predictions(rng, 1.0, 1.0), {"all": np.ones(200, dtype=bool)}, 8,
                                      resamples=400, seed=draw)["all"]["interval_95"]
        equal += low <= 0 <= high
        low, _ = paired_difference(*_two_predictions(rng, 0.6, 1.4), {"all": np.ones(200, dtype=bool)}, 8,
                                   resamples=400, seed=draw)["all"]["interval_95"]
        better += low > 0
    assert equal >= 34 and better >= 38, (equal, better)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tiny_store, tiny_config, tmp_path_factory):
    values = tiny_config.to_dict()
    values["model"].update({"frame_features": 16, "modality_width": 32,
                            "hidden": [64, 64, 64], "slot_features": 8, "audio_input": "mel"})
    values["train"].update({"epochs": 2, "batch_size": 8})
    folder = tmp_path_factory.mktemp("eval")
    config = folder / "train.yaml"
    config.write_text(dump_config(from_dict(values)))
    out = folder / "run"
    done = subprocess.run(
        [sys.executable, "-m", "giblet_cli.main", "train", "--data", str(tiny_data), "--out", str(out),
         "--store", str(tiny_store.path), "--config", str(config)],
        capture_output=True, text=True, env=dict(os.environ, GIBLET_PROGRESS="0"), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow  # trained_run: `giblet train` for 2 epochs in a subprocess
def test_evaluate_writes_metrics_maps_and_plots(trained_run, tiny_data, tiny_store):
    result = runner.invoke(app, ["evaluate", str(trained_run), "--store", str(tiny_store.path)])
    assert result.exit_code == 0, result.output
    out = trained_run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mean_r", "median_r", "mean_r_subject", "noise_ceiling_mean", "noise_normalized_r", "n_voxels", "test_trs"):
        assert key in metrics, key
    assert np.isfinite(metrics["baselines"]["ridge"]["mean_r"])
    # The same features through the canonical HRF the run's settings name, instead of FIR delays.
    assert np.isfinite(metrics["baselines"]["ridge_hrf"]["mean_r"]) and metrics["baselines"]["ridge_hrf"]["hrf"] == "glover"
    # The same blocks, one kernel per stream: the shares of the block weights over the voxels sum to 1.
    shares = metrics["baselines"]["ridge_banded"]["block_weight_shares"]
    assert set(shares) == {"video", "audio", "text"} and sum(shares.values()) == pytest.approx(1.0)
    assert np.isfinite(metrics["baselines"]["ridge_banded"]["mean_r"])
    start, stop = tiny_store.splits["test"]
    assert metrics["test_trs"] == [start, stop] and metrics["n_voxels"] == tiny_store.n_voxels
    mask, affine = tiny_store.mask()
    prediction = nib.load(str(out / "prediction_test.nii.gz"))
    assert prediction.shape == mask.shape + (stop - start,)
    np.testing.assert_allclose(prediction.affine, affine)
    values = np.asarray(prediction.dataobj)
    assert np.all(values[~mask] == 0)
    # The r map is the per-voxel r of that prediction against the held-out group mean.
    r_map = np.asarray(nib.load(str(out / "r_map.nii.gz")).dataobj)
    group = np.asarray(tiny_store.fmri_mean()[start:stop], dtype=np.float32)
    np.testing.assert_allclose(r_map[mask], pearson_r(values[mask].T, group), atol=1e-4)
    assert metrics["mean_r"] == pytest.approx(float(r_map[mask].mean()), abs=1e-5)
    assert (out / "r_map.png").stat().st_size > 1000 and (out / "r_histogram.png").stat().st_size > 1000
    # The synthetic truth: scores on the voxels that carry signal, against what the true signal itself scores.
    truth = metrics["truth"]
    signal = np.load(tiny_data / "_truth" / "signal.npy")
    assert truth["signal_voxels"] == int((signal.std(axis=0) > 0).sum()) < tiny_store.n_voxels
    # The noise-free signal against the measured group mean on the test TRs: near the expected ceiling if the
    # TRs line up (a one-TR shift of a 1.5 s TR series drops it well below).
    assert truth["true_signal_r"] > 0.5 and abs(truth["true_signal_r"] - truth["noise_ceiling"]) < 0.15
    for name in ("ridge", "ridge_hrf"):  # tiny has few test TRs
        assert truth[name]["mean_r"] > max(0.05, truth[name]["mean_r_noise_voxels"] + 0.03), name
    assert truth["model"]["fraction_of_ceiling"] == pytest.approx(truth["model"]["mean_r"] / truth["true_signal_r"])
    assert "fraction of the ceiling" in result.output
    # Per subject, against the leave-one-subject-out ceiling: the noise-free signal beats that ceiling (it is
    # computed from a noisy mean of the other subjects), and the model's ratio is its mean r over the ceiling.
    per_subject = truth["per_subject"]
    assert per_subject["noise_free_signal_over_noise_ceiling"] > 1.05
    assert per_subject["model_over_noise_ceiling"] == pytest.approx(per_subject["model_mean_r_subject"] / per_subject["noise_ceiling_mean"])
    subjects = np.asarray(tiny_store.fmri()[:, start:stop], dtype=np.float32)
    carries = signal.std(axis=0) > 0
    assert per_subject["noise_ceiling_mean"] == pytest.approx(float(noise_ceiling(subjects)[carries].mean()), abs=1e-5)
    assert "leave-one-out ceiling, signal voxels" in result.output
    # Per kind of signal region: the kinds the truth has, every signal voxel once, and the overall mean as
    # their voxel-weighted mean.
    kinds = np.load(tiny_data / "_truth" / "tuning.npz")["region_kind"]
    by_kind = truth["by_kind"]
    assert set(by_kind) == set(kinds[signal.std(axis=0) > 0].tolist()) and "noise" not in by_kind
    assert sum(entry["voxels"] for entry in by_kind.values()) == truth["signal_voxels"]
    for name in ("model", "ridge", "ridge_hrf", "ridge_banded"):
        weighted = sum(entry["voxels"] * entry[name]["mean_r"] for entry in by_kind.values()) / truth["signal_voxels"]
        assert weighted == pytest.approx(truth[name]["mean_r"], abs=1e-5)
        for entry in by_kind.values():
            assert entry[name]["fraction_of_ceiling"] == pytest.approx(entry[name]["mean_r"] / entry["true_signal_r"])
    assert "auditory (" in result.output and "fraction, model / ridge / ridge_hrf / ridge_banded" in result.output
    # The model's lead over each baseline, with the block bootstrap's interval: over all voxels in mean r, on the
    # signal voxels and per kind in fractions of the ceiling.
    for name in ("ridge", "ridge_hrf", "ridge_banded"):
        lead = metrics["baselines"][name]["model_minus_this"]
        assert lead["difference"] == pytest.approx(metrics["mean_r"] - metrics["baselines"][name]["mean_r"], abs=1e-5)
        assert lead["interval_95"][0] <= lead["interval_95"][1]
        lead = truth[name]["model_minus_this"]
        assert lead["difference"] == pytest.approx(truth["model"]["fraction_of_ceiling"] - truth[name]["fraction_of_ceiling"], abs=1e-5)
        for entry in by_kind.values():
            expected = entry["model"]["fraction_of_ceiling"] - entry[name]["fraction_of_ceiling"]
            assert entry[name]["model_minus_this"]["difference"] == pytest.approx(expected, abs=1e-5)
    assert "model - ridge_banded" in result.output and "auditory: model - ridge_banded" in result.output
    # r against the noise-free signal on the signal voxels, from the written prediction.
    first = int(tiny_store.manifest["alignment"]["first_tr"])
    carries = signal.std(axis=0) > 0
    against_signal = pearson_r(values[mask].T[:, carries], signal[first + start : first + stop][:, carries].astype(np.float32))
    assert truth["model"]["r_vs_signal"] == pytest.approx(float(against_signal.mean()), abs=1e-4)
