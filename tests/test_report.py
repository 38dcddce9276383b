"""`giblet report RUN`: one offline page, rendered in headless Chromium, every image and media element loaded;
missing parts say what to run; the folder is written whole or not at all."""

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from giblet_cli.main import app

from conftest import STORE_SETTINGS

runner = CliRunner()

SMALL_MODEL = {"frame_features": 16, "modality_width": 32, "hidden": [32, 32], "slot_features": 8, "audio_input": "mel"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dom(index):
    """The page's DOM after its scripts ran, from headless Chromium; CI sets GIBLET_REQUIRE_CHROMIUM=1 so a
    missing browser fails there instead of skipping."""
    if CHROMIUM is None:
        if os.environ.get("GIBLET_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (GIBLET_REQUIRE_CHROMIUM=1): apt-get install chromium")
        pytest.skip("chromium is not installed")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                           "--dump-dom", index.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained_run(tiny_store, tmp_path_factory):
    """A run trained one epoch on the tiny store (a small model), evaluated, and its cube atlas lesioned."""
    from giblet.config import from_dict
    from giblet.data.parcels import cube_atlas
    from giblet.eval.atlas import lesion_atlas
    from giblet.eval.evaluate import evaluate
    from giblet.train.trainer import train, write_run_config

    run = tmp_path_factory.mktemp("report") / "run"
    settings = from_dict({**STORE_SETTINGS, "model": SMALL_MODEL, "train": {"epochs": 1, "log_every_steps": 2}}, "test")
    write_run_config(settings, run)
    train(settings, tiny_store, run)
    evaluate(run, tiny_store.path, "ridge", "test")
    mask, affine = tiny_store.mask()
    atlas = run.parent / "cubes5.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, cube_atlas(mask, 5), 0).astype(np.int32), affine), str(atlas))
    lesion_atlas(run, atlas, store_path=tiny_store.path, permutations=3, progress=False)
    return run


def test_the_report_opens_offline_with_every_image_and_media_loaded_and_names_the_run(trained_run, tiny_store):
    result = runner.invoke(app, ["report", str(trained_run), "--store", str(tiny_store.path)])
    assert result.exit_code == 0, result.output
    index = trained_run / "report" / "index.html"
    assert str(index) in result.output.replace("\n", "")
    page = index.read_text()
    # Self-contained: no address outside the folder.
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    dom = _dom(index)
    assert 'data-loaded="ok"' in dom, dom[dom.find("load-status") - 200:][:600]
    assert f"giblet report: {trained_run.name}" in dom
    # Every part is there: the maps of the model, the ceiling and each baseline, the atlas maps, the top parcels' media.
    assets = {p.name for p in (trained_run / "report" / "assets").iterdir()}
    for name in ("training.png", "r_model.png", "noise_ceiling.png", "r_ridge.png", "r_ridge_hrf.png", "r_ridge_banded.png",
                 "r_model_view.html", "carries_video.png", "carries_audio.png", "carries_text.png"):
        assert name in assets
    assert dom.count("<img") >= 10 and "<video" in dom and dom.count("<audio") >= 3
    assert "nearest, lesioned" in dom and "No eval/" not in dom and "No lesion atlas" not in dom
    # Beside each baseline, giblet's lead over it with its interval from `giblet evaluate`.
    lead = json.loads((trained_run / "eval" / "metrics.json").read_text())["baselines"]["ridge_banded"]["model_minus_this"]
    low, high = lead["interval_95"]
    assert "lead in mean r (95% interval)" in dom and f"{lead['difference']:+.3f} [{low:+.3f}, {high:+.3f}]" in dom
    # The store is in MNI space (the synthetic scans' headers say so): the maps get a glass brain too.
    assert tiny_store.space == "mni" and "r_model_glass.png" in assets


def test_a_run_without_evaluation_or_lesions_gets_a_report_that_says_what_to_run(trained_run, tiny_store, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(trained_run / name, bare / name)
    result = runner.invoke(app, ["report", str(bare), "--store", str(tiny_store.path)])
    assert result.exit_code == 0, result.output
    dom = _dom(bare / "report" / "index.html")
    assert 'data-loaded="ok"' in dom
    assert f"giblet evaluate {bare}" in dom and f"giblet lesion {bare} --atlas" in dom
    assert "giblet data atlas cubes" in dom


def test_a_folder_that_is_not_a_run_is_refused_and_a_folder_that_is_not_a_report_is_left_alone(trained_run, tiny_store, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "is not a run folder" in result.output
    assert not (tmp_path / "report").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["report", str(trained_run), "--store", str(tiny_store.path), "--out", str(keep)])
    assert result.exit_code != 0 and "is not a giblet report" in result.output
    assert (keep / "notes.txt").read_text() == "mine" and sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written report left beside it


def test_the_store_keeps_the_mean_functional_image_and_the_space(tiny_store, tiny_data):
    from giblet.data.volume import load_values

    assert tiny_store.space == "mni"
    mean = load_values(tiny_store.mean_image(), tiny_store.mask())
    first = sorted((tiny_data / "sherlock_nii").glob("*.nii.gz"))[0]
    # The mean over subjects of each voxel's training-TR mean: the raw signal's scale, nothing like a z-score's 0.
    assert mean.shape == (tiny_store.n_voxels,) and np.all(np.isfinite(mean)) and float(mean.mean()) > 10
    raw = np.asarray(nib.load(str(first)).dataobj[..., :5], dtype=np.float64)[tiny_store.mask()[0]].mean()
    assert 0.5 < float(mean.mean()) / raw < 2.0
    assert json.loads((tiny_store.path / "manifest.json").read_text())["fmri"]["mean_image_file"] == "mean_image.nii.gz"
