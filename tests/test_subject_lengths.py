"""Subjects of different lengths: a subject cut short is used for the TRs it has, and named; one too short to
train on is refused, naming its file (never another's)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from giblet.config import dump_config, from_dict
from giblet.data.check import FAIL, WARN, check_data
from giblet.data.dataset import WindowDataset
from giblet.data.store import open_store, prepare
from giblet.errors import DataError
from giblet.eval.metrics import mean_subject_r, noise_ceiling, pearson_r

SHORT_BY = 25


def _subject_files(data: Path):
    return sorted((data / "sherlock_nii").glob("*.nii.gz"))


def _cut(data: Path, path: Path, n_trs: int) -> None:
    image = nib.load(str(path))
    values = np.asarray(image.dataobj, dtype=np.float32)[..., :n_trs]
    new = nib.Nifti1Image(values, image.affine, image.header)
    new.header.set_data_dtype(np.float32)
    nib.save(new, str(path))


def _copy_with_short_subject(tiny_data: Path, folder: Path, by: int, which: int = 1) -> Path:
    data = folder / "data"
    shutil.copytree(tiny_data, data)
    path = _subject_files(data)[which]
    _cut(data, path, nib.load(str(path)).shape[-1] - by)
    return data


@pytest.fixture(scope="module")
def short_data(tiny_data, tmp_path_factory):
    return _copy_with_short_subject(tiny_data, tmp_path_factory.mktemp("short"), SHORT_BY)


@pytest.fixture(scope="module")
def short_store(short_data, tiny_config, tmp_path_factory):
    return prepare(short_data, tiny_config, tmp_path_factory.mktemp("short_store") / "store", progress=False)


def test_validate_warns_naming_the_short_subject_and_passes(short_data, tiny_config):
    checks = check_data(short_data, tiny_config, load_models=False)
    failed = [c for c in checks if c.status == FAIL]
    assert not failed, failed
    short_name = _subject_files(short_data)[1].name
    warned = [c for c in checks if c.status == WARN and short_name in c.detail]
    assert [c.name for c in warned] == ["alignment"], checks
    assert f"{SHORT_BY} fewer" in warned[0].detail
    others = [p.name for i, p in enumerate(_subject_files(short_data)) if i != 1]
    assert not any(name in warned[0].detail for name in others)


def test_the_store_marks_missing_trs_and_the_mean_uses_the_subjects_present(short_store):
    n = short_store.n_trs
    assert short_store.subject_trs == [n, n - SHORT_BY] + [n] * (len(short_store.subjects) - 2)
    present = short_store.present()
    assert present.shape == (len(short_store.subjects), n)
    assert present[1, : n - SHORT_BY].all() and not present[1, n - SHORT_BY :].any()
    subjects = np.asarray(short_store.fmri(), dtype=np.float32)
    mean = np.asarray(short_store.fmri_mean(), dtype=np.float32)
    assert np.all(subjects[1, n - SHORT_BY :] == 0)
    others = np.delete(subjects, 1, axis=0)
    # float16 storage: the mean and the subjects each round to ~1e-3.
    np.testing.assert_allclose(mean[n - SHORT_BY :], others[:, n - SHORT_BY :].mean(axis=0), atol=3e-3)
    np.testing.assert_allclose(mean[: n - SHORT_BY], subjects[:, : n - SHORT_BY].mean(axis=0), atol=3e-3)


def test_per_subject_samples_skip_the_trs_a_subject_lacks(short_store):
    start, stop = short_store.splits["test"]
    assert short_store.subject_trs[1] < stop  # the cut reaches the test block
    dataset = WindowDataset(short_store, "test", mode="per_subject")
    has = np.clip(short_store.subject_trs[1] - start, 0, stop - start)
    assert len(dataset) == (stop - start) * len(short_store.subjects) - ((stop - start) - has)
    batch = dataset.batch(np.arange(len(dataset)))
    pairs = set(zip(batch["subject"].tolist(), batch["tr"].tolist()))
    assert not any(s == 1 and t >= short_store.subject_trs[1] for s, t in pairs)
    assert len(pairs) == len(dataset)


def test_ceiling_and_subject_scores_use_the_subjects_present_at_each_tr():
    rng = np.random.default_rng(3)
    signal = rng.normal(size=(200, 5))
    subjects = signal[None] + rng.normal(size=(4, 200, 5))
    full = np.ones((4, 200), dtype=bool)
    np.testing.assert_allclose(noise_ceiling(subjects, full), noise_ceiling(subjects))
    # A subject that lacks the whole block: the ceiling is the other three's.
    absent = full.copy()
    absent[2] = False
    damaged = subjects.copy()
    damaged[2] = 0.0  # what the store holds where a subject has no TR
    np.testing.assert_allclose(noise_ceiling(damaged, absent), noise_ceiling(np.delete(subjects, 2, axis=0)))
    # Zeros counted as data would pull every other subject's leave-one-out mean towards 0 and lower the ceiling.
    assert noise_ceiling(damaged).mean() < noise_ceiling(damaged, absent).mean() - 0.02
    # Cut short: its score is over its TRs only.
    cut = full.copy()
    cut[0, 150:] = False
    prediction = signal + 0.5 * rng.normal(size=signal.shape)
    expected = np.mean([pearson_r(prediction[:150], subjects[0, :150])]
                       + [pearson_r(prediction, subjects[s]) for s in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(mean_subject_r(prediction, subjects, cut), expected)


def test_a_subject_missing_training_trs_is_refused_by_name(tiny_data, tiny_config, tmp_path):
    # Cut into the training block: only the last subject is too short.
    n = nib.load(str(_subject_files(tiny_data)[0])).shape[-1]
    data = _copy_with_short_subject(tiny_data, tmp_path, by=n // 2, which=-1)
    short_name = _subject_files(data)[-1].name
    checks = check_data(data, tiny_config, load_models=False)
    failed = [c for c in checks if c.status == FAIL]
    assert [c.name for c in failed] == ["subject lengths"], checks
    assert short_name in failed[0].detail and "training block" in failed[0].detail
    assert _subject_files(data)[0].name not in failed[0].detail
    out = tmp_path / "out" / "store"
    with pytest.raises(DataError) as error:
        prepare(data, tiny_config, out, progress=False)
    assert short_name in str(error.value) and "data.subjects" in str(error.value)
    assert not out.exists()


def test_a_short_subject_trains_and_evaluates(short_store, short_data, tiny_config, tmp_path):
    values = tiny_config.to_dict()
    values["model"].update({"frame_features": 16, "modality_width": 32, "hidden": [64, 64, 64],
                            "slot_features": 8, "audio_input": "mel"})
    values["train"].update({"epochs": 1, "batch_size": 8})
    config = tmp_path / "train.yaml"
    config.write_text(dump_config(from_dict(values)))
    run = tmp_path / "run"
    env = dict(os.environ, GIBLET_PROGRESS="0")
    for command in (["train", "--data", str(short_data), "--out", str(run), "--store", str(short_store.path),
                     "--config", str(config)], ["evaluate", str(run)]):
        done = subprocess.run([sys.executable, "-m", "giblet_cli.main", *command], capture_output=True, text=True,
                              env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    import json

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["mean_r_subject"]) and np.isfinite(metrics["noise_ceiling_mean"])
    assert open_store(short_store.path).subject_trs[1] == short_store.n_trs - SHORT_BY
