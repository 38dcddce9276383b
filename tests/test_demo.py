"""`giblet demo`: synth -> validate -> prepare -> train -> evaluate -> lesion atlas -> report, end to end on the CPU."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # trains for 2 epochs in a subprocess, then runs the demo again
def test_demo_runs_the_pipeline_and_says_where_the_results_are(tiny_data, tiny_store, tmp_path):
    # The demo's configuration gives the session's tiny store (the same store settings), so the
    # synthesized data and the prepared store are reused here instead of being made again.
    out = tmp_path / "demo"
    out.mkdir()
    (out / "data").symlink_to(tiny_data, target_is_directory=True)
    (out / "store").symlink_to(tiny_store.path, target_is_directory=True)
    command = [sys.executable, "-m", "giblet_cli.main", "demo", "--out", str(out), "--epochs", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, GIBLET_PROGRESS="0", COLUMNS="200"),
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert stage in done.stdout
    assert "op checks passed" in done.stdout and "data checks passed" in done.stdout
    assert f"reusing {out / 'data'}" in done.stdout
    metrics = json.loads((out / "run" / "eval" / "metrics.json").read_text())
    assert metrics["n_voxels"] == tiny_store.n_voxels and "ridge" in metrics["baselines"]
    assert metrics["truth"]["signal_voxels"] > 0
    assert f"mean_r {metrics['mean_r']:.4f}".split()[1] in done.stdout
    index = out / "run" / "report" / "index.html"
    assert str(index) in done.stdout.replace("\n", "") and index.is_file()
    atlas = json.loads((out / "run" / "lesion" / "atlas-cubes5" / "atlas.json").read_text())
    assert len(atlas["parcels"]) > 10 and set(atlas["top"]) == {"video", "audio", "text"}
    assert "carries most video: parcel" in done.stdout
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("epoch", 0) for r in records) == 2
    # A second call resumes the finished run instead of training again.
    again = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, GIBLET_PROGRESS="0", COLUMNS="200"),
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "had already finished" in again.stdout
