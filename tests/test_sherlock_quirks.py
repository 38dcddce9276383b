"""The real Sherlock release's facts (configs/sherlock.yaml) and its quirks at a small size (the sherlock-quirks
synthetic preset): fMRI shifted earlier by 3 TRs, one subject's file short, the release's workbook columns with
their stray trailing spaces, scans running past the movie. End to end: validate passes with a warning naming the
short subject's file, then prepare, train and evaluate."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from giblet.config import dump_config, from_dict, load_config
from giblet.data.synth import PRESETS, SHERLOCK_ANNOTATION_COLUMNS

SHERLOCK = Path(__file__).resolve().parents[1] / "configs" / "sherlock.yaml"
QUIRKS = PRESETS["sherlock-quirks"]
SHORT = "sherlock_movie_s5.nii.gz"


def test_the_sherlock_config_loads_and_holds_the_release_facts():
    config = load_config(SHERLOCK)
    assert config.alignment.preshift_trs == 3
    assert config.text.embedder == "BAAI/bge-large-en-v1.5"
    assert config.audio.encodec_model == "encodec_24khz" and config.audio.bandwidth_kbps == 6.0
    assert "codes" in config.audio.features and "mel" in config.audio.features  # mel: the linear branch's audio block
    assert config.data.fmri == "sherlock_nii/sherlock_movie_s*.nii.gz" and config.data.subjects is None
    assert config.text.text_columns == ["Scene Details - A Level"]
    # Every fact of the file has its comment: each key line ends in one, or the line above is one.
    lines = SHERLOCK.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s+\w+:\s*\S", line):
            assert "#" in line or lines[i - 1].strip().startswith("#"), line
    # The quirks preset reproduces the facts it can at a small size.
    assert QUIRKS.tr_s == 1.5 and QUIRKS.preshift_trs == config.alignment.preshift_trs
    assert QUIRKS.short_subjects == ((5, 25),) and QUIRKS.scan_trs > QUIRKS.movie_trs and QUIRKS.sherlock_workbook


def _quirks_config(tmp_path: Path) -> Path:
    """configs/sherlock.yaml with the offline stand-ins the tests use (the default embedder, random EnCodec
    codebooks) and a model small enough to train 2 epochs in a test."""
    values = yaml.safe_load(SHERLOCK.read_text())
    values["text"]["embedder"] = from_dict({}).text.embedder
    values["audio"]["encodec_model"] = "random"
    values["window"] = {"lookback_s": 8.0}
    values["model"] = {"frame_features": 16, "modality_width": 32, "hidden": [64, 64, 64], "slot_features": 8}
    values["train"] = {"epochs": 2, "batch_size": 8}
    path = tmp_path / "quirks.yaml"
    path.write_text(dump_config(from_dict(values, "quirks")))
    return path


def _giblet(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIBLET_PROGRESS="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "giblet_cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=1200)


@pytest.mark.slow  # synthesizes a dataset, then validates, prepares, trains 2 epochs and evaluates it
def test_the_quirks_dataset_validates_with_a_warning_then_trains_and_evaluates(tmp_path):
    from giblet.data.check import WARN, check_data
    from giblet.data.synth import synthesize
    from giblet.data.text import read_annotations

    data = synthesize(tmp_path / "quirks", "sherlock-quirks", seed=0, progress=False)
    files = sorted((data / "sherlock_nii").glob("*.nii.gz"))
    lengths = {path.name: nib.load(str(path)).shape[-1] for path in files}
    assert len(files) == 5 and lengths[SHORT] == QUIRKS.scan_trs - 25
    assert all(n == QUIRKS.scan_trs for name, n in lengths.items() if name != SHORT)
    # The workbook's headers end in spaces and it has more columns than giblet reads: they are matched anyway.
    from openpyxl import load_workbook

    header = [cell.value for cell in next(load_workbook(data / "annotations.xlsx", read_only=True).active.iter_rows())]
    assert tuple(header) == SHERLOCK_ANNOTATION_COLUMNS and "Start Time (s) " in header
    config_path = _quirks_config(tmp_path)
    config = load_config(config_path)
    t = config.text
    segments = read_annotations(data / "annotations.xlsx", t.start_column, t.end_column, tuple(t.text_columns))
    assert len(segments.texts) > 50 and segments.n_skipped == 0

    done = _giblet("validate", "--data", str(data), "--config", str(config_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # Rich wraps long cells over lines: compare without the table's spacing and rules.
    flat = re.sub(r"[\s│┃]", "", done.stdout)
    assert f"{SHORT}has{QUIRKS.scan_trs - 25}TRs" in flat, done.stdout[-4000:]
    assert "withawarning:alignment)" in flat, done.stdout[-4000:]  # the response lag passes: the setting is right
    # Without the setting the scans are seen to be shifted.
    unset = load_config(config_path)
    unset.alignment.preshift_trs = 0
    lag = next(c for c in check_data(data, unset, load_models=False) if c.name == "response lag")
    assert lag.status == WARN and "alignment.preshift_trs: 3" in lag.detail

    store, run = tmp_path / "store", tmp_path / "run"
    for command in (["data", "prepare", str(data), "--out", str(store), "--config", str(config_path)],
                    ["train", "--data", str(data), "--out", str(run), "--store", str(store), "--config", str(config_path)],
                    ["evaluate", str(run)]):
        done = _giblet(*command)
        assert done.returncode == 0, " ".join(command) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["settings"]["alignment"]["preshift_trs"] == 3
    assert manifest["alignment"]["n_trs"] == QUIRKS.movie_trs  # the scans' TRs after the movie are dropped
    assert manifest["fmri"]["subject_trs"] == [QUIRKS.movie_trs] * 4 + [QUIRKS.scan_trs - 25]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["mean_r"]) and np.isfinite(metrics["noise_ceiling_mean"])
    # The HRF-based baseline reads the shifted scans at the right lag: measured 0.36, and 0.06 without the setting.
    assert metrics["truth"]["ridge_banded"]["fraction_of_ceiling"] > 0.2, metrics["truth"]
