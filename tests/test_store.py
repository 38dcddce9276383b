"""The prepared store: matches the ground truth, is keyed and reused, is atomic, and refuses bad input clearly."""

import json
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from giblet.config import from_dict
from giblet.data import store as store_mod
from giblet.data.store import open_store, prepare, store_key
from giblet.errors import DataError


def _truth(data: Path):
    return json.loads((data / "_truth" / "truth.json").read_text())


def test_manifest_matches_the_truth(tiny_data, tiny_store):
    m = tiny_store.manifest
    brain = nib.load(str(tiny_data / "_truth" / "brain_mask.nii.gz")).get_fdata() > 0
    assert m["fmri"]["n_voxels"] == int(brain.sum())
    mask, affine = tiny_store.mask()
    np.testing.assert_array_equal(mask, brain)
    codes = m["audio"]["codes"]
    assert codes["n_codebooks"] == 8 == int(6.0 / 0.75)
    assert tiny_store.codes().shape[0] == 8 and tiny_store.codes().dtype == np.int16
    assert m["text"]["embedding_size"] == 384
    truth = _truth(tiny_data)
    assert m["alignment"]["tr_s"] == truth["tr_s"]
    assert m["alignment"]["n_trs"] == truth["n_trs"]
    assert tuple(m["fmri"]["shape"]) == (len(m["fmri"]["subjects"]), truth["n_trs"], int(brain.sum()))


def test_frames_per_window_come_from_exact_times(tiny_store):
    m = tiny_store.manifest
    rate = Fraction(m["video"]["fps_fraction"])
    tr = Fraction(m["alignment"]["tr_s"]).limit_denominator(1000)
    lookback = Fraction(m["window"]["lookback_s"]).limit_denominator(1000)
    n_frames = m["video"]["shape"][0]
    counts = []
    for t in range(m["alignment"]["n_trs"]):
        start, stop = t * tr - lookback, (t + 1) * tr
        first = max(0, math.ceil(start * rate))
        last = min(n_frames, math.ceil(stop * rate))
        counts.append(last - first)
    assert m["video"]["per_window"] == {"min": min(counts), "max": max(counts)}
    per_tr = [min(n_frames, math.ceil((t + 1) * tr * rate)) - math.ceil(t * tr * rate) for t in range(m["alignment"]["n_trs"])]
    assert m["video"]["per_tr"] == {"min": min(per_tr), "max": max(per_tr)}


def test_no_stream_is_stretched(tiny_data, tiny_store):
    import av

    m = tiny_store.manifest
    with av.open(str(tiny_data / "stimuli_Sherlock.m4v")) as container:
        stream = container.streams.video[0]
        pts = np.array([float(f.pts * f.time_base) for f in container.decode(stream)])
    pts -= pts[0]
    np.testing.assert_allclose(np.asarray(tiny_store.video_times()), pts, atol=1e-6)
    assert m["video"]["rate_hz"] == pytest.approx(float(Fraction(m["video"]["fps_fraction"])))
    codes = m["audio"]["codes"]
    assert codes["rate_hz"] == 75.0
    # Codes cover the soundtrack at 75 Hz: their count is its duration times 75, not the TR count times anything.
    assert codes["shape"][1] == math.ceil(round(m["audio"]["duration_s"] * codes["model_sample_rate"]) / 320)


def test_fmri_is_z_scored_with_train_statistics_and_the_mean_is_the_mean(tiny_store):
    fmri = np.asarray(tiny_store.fmri(), dtype=np.float32)
    start, stop = tiny_store.splits["train"]
    train = fmri[:, start:stop]
    np.testing.assert_allclose(train.mean(axis=1), 0.0, atol=2e-3)
    np.testing.assert_allclose(train.std(axis=1), 1.0, atol=2e-3)
    held_out = fmri[:, tiny_store.splits["test"][0] :]
    assert abs(held_out.mean()) > 0 or abs(held_out.std() - 1) > 0  # statistics were not taken from these TRs
    np.testing.assert_allclose(np.asarray(tiny_store.fmri_mean(), dtype=np.float32), fmri.mean(axis=0), atol=2e-3)
    assert np.isfinite(fmri).all()


def test_text_embeddings_are_unit_vectors_with_times(tiny_store):
    embeddings = np.asarray(tiny_store.text_embeddings(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=2e-3)
    times = tiny_store.text_times()
    assert times.shape == (embeddings.shape[0], 2) and np.all(times[:, 1] >= times[:, 0])
    assert len(tiny_store.texts()) == embeddings.shape[0]


def test_a_second_prepare_reuses_the_store(tiny_data, tiny_config, tiny_store):
    before = (tiny_store.path / "manifest.json").stat().st_mtime_ns
    again = prepare(tiny_data, tiny_config, tiny_store.path, progress=False)
    assert again.key == tiny_store.key
    assert (tiny_store.path / "manifest.json").stat().st_mtime_ns == before


def test_any_change_of_input_or_setting_changes_the_key(tiny_data, tiny_config, tmp_path):
    sources = store_mod.find_sources(tiny_data, tiny_config)
    digests = store_mod._source_digests(sources)
    key = store_key(digests, tiny_config)
    assert store_key(digests, from_dict(tiny_config.to_dict())) == key
    for section, name, value in (("video", "width", 80), ("window", "lookback_s", 6.0), ("text", "embedder", "other")):
        settings = tiny_config.to_dict()
        settings[section][name] = value
        assert store_key(digests, from_dict(settings)) != key, (section, name)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    subject = sorted((copy / "sherlock_nii").glob("*.nii.gz"))[0]
    with open(subject, "r+b") as handle:  # a different file, same layout
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    changed = store_mod._source_digests(store_mod.find_sources(copy, tiny_config))
    assert store_key(changed, tiny_config) != key


def test_a_crash_leaves_no_half_store_and_keeps_the_old_one(tiny_data, tiny_config, tiny_store, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed during the video decode")

    monkeypatch.setattr(store_mod, "_write_video", crash)
    out = tmp_path / "store"
    with pytest.raises(RuntimeError):
        prepare(tiny_data, tiny_config, out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    # A rebuild that crashes leaves the previous store as it was.
    shutil.copytree(tiny_store.path, out)
    with pytest.raises(RuntimeError):
        prepare(tiny_data, tiny_config, out, progress=False, force=True)
    assert open_store(out).key == tiny_store.key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# --------------------------------------------------------------------------- bad input


def _copy(tiny_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy, ignore=shutil.ignore_patterns("_truth"))
    return copy


def _refused(data: Path, config, tmp_path: Path, *fragments: str) -> str:
    out = tmp_path / "out" / "store"
    with pytest.raises(DataError) as error:
        prepare(data, config, out, progress=False)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return message


def test_missing_file(tiny_data, tiny_config, tmp_path):
    data = _copy(tiny_data, tmp_path)
    (data / "annotations.xlsx").unlink()
    _refused(data, tiny_config, tmp_path, "annotations.xlsx", "file not found", "data.annotations")


def test_wrong_annotation_columns(tiny_data, tiny_config, tmp_path):
    import openpyxl

    data = _copy(tiny_data, tmp_path)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Onset", "Offset", "Description"])
    sheet.append([0.0, 5.0, "a scene"])
    book.save(data / "annotations.xlsx")
    _refused(data, tiny_config, tmp_path, "annotations.xlsx", "text.start_column")


def test_movie_without_audio(tiny_data, tiny_config, tmp_path):
    import av

    data = _copy(tiny_data, tmp_path)
    movie = data / "stimuli_Sherlock.m4v"
    silent = data / "silent.m4v"
    with av.open(str(movie)) as source, av.open(str(silent), "w", format="mp4") as target:
        video_in = source.streams.video[0]
        video_out = target.add_stream_from_template(video_in)
        for packet in source.demux(video_in):
            if packet.dts is None:
                continue
            packet.stream = video_out
            target.mux(packet)
    silent.replace(movie)
    _refused(data, tiny_config, tmp_path, "stimuli_Sherlock.m4v", "audio")


def _rewrite_subjects(data: Path, change) -> Path:
    first = sorted((data / "sherlock_nii").glob("*.nii.gz"))[0]
    for path in sorted((data / "sherlock_nii").glob("*.nii.gz")):
        image = nib.load(str(path))
        values = change(np.asarray(image.dataobj, dtype=np.float32), path)
        if values is None:
            continue
        new = nib.Nifti1Image(values.astype(np.float32), image.affine, image.header)
        new.header.set_data_dtype(np.float32)
        nib.save(new, str(path))
    return first


def test_tr_mismatch_beyond_tolerance(tiny_data, tiny_config, tmp_path):
    data = _copy(tiny_data, tmp_path)
    _rewrite_subjects(data, lambda values, path: values[..., : values.shape[-1] // 2])
    _refused(data, tiny_config, tmp_path, "stimuli_Sherlock.m4v", "max_stimulus_beyond_s")


def test_corrupt_gzip(tiny_data, tiny_config, tmp_path):
    data = _copy(tiny_data, tmp_path)
    subject = sorted((data / "sherlock_nii").glob("*.nii.gz"))[1]
    raw = subject.read_bytes()
    subject.write_bytes(raw[: len(raw) // 2] + bytes(1000))
    _refused(data, tiny_config, tmp_path, subject.name)


def test_nan_only_subject(tiny_data, tiny_config, tmp_path):
    data = _copy(tiny_data, tmp_path)
    target = sorted((data / "sherlock_nii").glob("*.nii.gz"))[-1]
    _rewrite_subjects(data, lambda values, path: np.full_like(values, np.nan) if path == target else None)
    _refused(data, tiny_config, tmp_path, target.name)


def test_encodec_codes_with_a_batch_axis(tiny_data, tiny_config, tmp_path, monkeypatch):
    from giblet.data import audio

    real = audio.encode_codes
    monkeypatch.setattr(audio, "encode_codes", lambda *a, **k: real(*a, **k)[None])
    message = _refused(tiny_data, tiny_config, tmp_path, "(n_codebooks, n_frames)")
    assert "EnCodec codes" in message


def test_a_store_of_other_settings_is_never_replaced_silently(tiny_data, tiny_config, tiny_store, tmp_path):
    # A run depends on its store: preparing other settings into the same folder is refused, naming what differs.
    out = tmp_path / "store"
    shutil.copytree(tiny_store.path, out)
    values = tiny_config.to_dict()
    values["window"]["lookback_s"] = values["window"]["lookback_s"] + 1.5
    with pytest.raises(DataError) as error:
        prepare(tiny_data, from_dict(values), out, progress=False)
    message = str(error.value)
    assert message.startswith(str(out)) and "window.lookback_s" in message and "--force" in message
    assert open_store(out).key == tiny_store.key  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_killed_prepare_leaves_nothing_the_next_one_does_not_clean(tiny_data, tiny_config, tiny_store, tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "store"
    shutil.copytree(tiny_store.path, out)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".store.tmp-{socket.gethostname()}-{int(ended.stdout)}"  # a prepare that was SIGKILLed
    (dead / "frames.npy").parent.mkdir()
    (dead / "frames.npy").write_bytes(b"0" * 1000)
    alive = tmp_path / f".store.tmp-{socket.gethostname()}-{os.getpid()}"  # one still running (this process)
    alive.mkdir()
    elsewhere = tmp_path / ".store.tmp-another-host-1"  # another node's: its processes are not ours to judge
    elsewhere.mkdir()
    assert prepare(tiny_data, tiny_config, out, progress=False).key == tiny_store.key  # reused, and cleaned
    assert not dead.exists() and alive.exists() and elsewhere.exists()


@pytest.mark.parametrize("name", ["fmri.bin", "text_embeddings.npy"])
def test_a_truncated_store_file_is_named_when_the_store_is_opened(tiny_store, tmp_path, name):
    copy = tmp_path / "store"
    shutil.copytree(tiny_store.path, copy)
    file = copy / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        open_store(copy)
    message = str(error.value)
    assert message.startswith(str(file)) and f"{len(data) // 2:,} bytes" in message and "--force" in message
