"""The synthetic Sherlock-layout dataset: formats, the ground truth it promises, causality and determinism."""

import json
import os
import sys

import av
import nibabel as nib
import numpy as np
import pytest
from openpyxl import load_workbook
from scipy import ndimage

from giblet.data import synth
from giblet.data.synth import PRESETS, synthesize
from giblet.errors import DataError

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def folder(tiny_data):
    """The session's tiny dataset (tests/conftest.py: synthesize(..., "tiny", seed=0)), read only."""
    return tiny_data


@pytest.fixture(scope="module")
def truth(folder):
    truth_dir = folder / "_truth"
    mask = nib.load(truth_dir / "brain_mask.nii.gz").get_fdata() > 0
    return {
        "summary": json.loads((truth_dir / "truth.json").read_text()),
        "signal": np.load(truth_dir / "signal.npy"),
        "features": dict(np.load(truth_dir / "features.npz")),
        "tuning": dict(np.load(truth_dir / "tuning.npz")),
        "ceiling": np.load(truth_dir / "noise_ceiling.npy"),
        "ceiling_empirical": np.load(truth_dir / "noise_ceiling_empirical.npy"),
        "mask": mask,
    }


@pytest.fixture(scope="module")
def subjects(folder):
    paths = sorted((folder / "sherlock_nii").glob("sherlock_movie_s*.nii.gz"))
    return [nib.load(path) for path in paths]


@pytest.fixture(scope="module")
def group_mean(subjects, truth):
    """(T, V) mean over subjects of the mask voxels, voxels in the mask's C order."""
    return np.mean([image.get_fdata(dtype=np.float32)[truth["mask"]].T for image in subjects], axis=0)


def _z(columns):
    columns = np.asarray(columns, dtype=np.float64)
    return (columns - columns.mean(axis=0)) / columns.std(axis=0)


def _lagged_correlation(response, feature, lag):
    """r between response[t] and feature[t - lag] over the TRs where both exist."""
    if lag >= 0:
        a, b = response[lag:], feature[: feature.size - lag]
    else:
        a, b = response[:lag], feature[-lag:]
    return float(np.corrcoef(a, b)[0, 1])


def test_layout(folder):
    expected = ["_truth", "annotations.xlsx", "sherlock_nii", "stimuli_Sherlock.m4v"]
    assert sorted(p.name for p in folder.iterdir()) == expected
    assert sorted(p.name for p in (folder / "sherlock_nii").iterdir()) == [
        f"sherlock_movie_s{n}.nii.gz" for n in range(1, TINY.n_subjects + 1)]
    for name in ("signal.npy", "features.npz", "tuning.json", "tuning.npz", "noise_ceiling.npy",
                 "noise_ceiling_empirical.npy", "truth.json", "brain_mask.nii.gz", "noise_only.nii.gz",
                 "region_visual.nii.gz", "region_auditory.nii.gz", "region_language.nii.gz", "region_mixed.nii.gz"):
        assert (folder / "_truth" / name).is_file(), name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tiny.synth-")], "temporary folder left behind"


def test_movie_is_h264_and_aac_at_sherlock_rates(folder, truth):
    summary = truth["summary"]
    with av.open(str(folder / "stimuli_Sherlock.m4v")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264"
        assert video.average_rate == 25
        assert (video.codec_context.width, video.codec_context.height) == (TINY.frame_width, TINY.frame_height)
        assert video.codec_context.pix_fmt == "yuv420p"
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.sample_rate == 44100
        assert audio.codec_context.channels == 2
        assert abs(video.frames / 25 - summary["movie_duration_s"]) <= 1 / 25
        assert abs(float(video.duration * video.time_base) - summary["movie_duration_s"]) <= 1 / 25
        assert abs(float(audio.duration * audio.time_base) - summary["movie_duration_s"]) <= 0.1


def test_drawn_brightness_follows_the_brightness_feature(folder, truth):
    features = truth["features"]
    brightness = features["visual_fine"][:, list(features["visual_names"]).index("brightness")]
    luminance, expected = [], []
    with av.open(str(folder / "stimuli_Sherlock.m4v")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= 25 * 90:
                break
            if index % 25 == 0:  # one frame per second: frame i is at i / 25 s, fine sample i / 25 / 0.05
                rgb = frame.to_ndarray(format="rgb24").astype(np.float64) / 255
                luminance.append(np.median(rgb @ [0.299, 0.587, 0.114]))
                expected.append(brightness[index * 4 // 5])
    assert np.corrcoef(luminance, expected)[0, 1] > 0.95
    assert np.max(np.abs(np.asarray(luminance) - expected)) < 0.1


def test_heard_loudness_follows_the_tone_loudness_feature(folder, truth):
    features = truth["features"]
    loudness = features["auditory_fine"][:, list(features["auditory_names"]).index("tone_loudness")]
    rms = []
    with av.open(str(folder / "stimuli_Sherlock.m4v")) as container:
        chunks = []
        for frame in container.decode(audio=0):
            chunks.append(frame.to_ndarray()[0])
            if sum(c.size for c in chunks) >= 44100 * 90:
                break
    sound = np.concatenate(chunks)[: 44100 * 90].reshape(90, 44100)
    rms = np.sqrt((sound**2).mean(axis=1))
    mid_second = loudness[10::20][:90]  # fine sample at 0.5 s into each second
    assert np.corrcoef(rms, mid_second)[0, 1] > 0.8


def test_annotations_have_sherlock_headers_overlaps_and_gaps(folder):
    sheet = load_workbook(folder / "annotations.xlsx", read_only=True).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0][:5] == ("Start Time (s) ", "End Time (s) ", "Scene Details - A Level ", "Name - All", "Location")
    assert len(rows[0]) == 6, "one extra column that readers must ignore"
    body = rows[1:]
    starts = np.array([row[0] for row in body], dtype=float)
    ends = np.array([row[1] for row in body], dtype=float)
    assert np.all(ends > starts) and np.all(np.diff(starts) >= 0)
    assert starts[0] >= 0 and ends.max() <= TINY.movie_duration_s
    previous_end = np.maximum.accumulate(ends)[:-1]
    assert np.any(starts[1:] < previous_end - 1e-6), "some segments overlap"
    assert np.any(starts[1:] > previous_end + 1e-6), "some segments leave gaps"
    for start, end, details, names, location, _ in body:
        assert location in details
        assert all(name in details for name in names.split(", "))
    assert len({row[2] for row in body}) > 20, "the text varies with the language features"


def test_fmri_files_are_4d_nifti_with_tr_and_one_affine(subjects, truth):
    summary = truth["summary"]
    for image in subjects:
        assert image.shape == (*TINY.grid_shape, TINY.scan_trs)
        assert image.header.get_zooms()[3] == pytest.approx(1.5)
        assert image.header.get_xyzt_units() == ("mm", "sec")
        assert image.get_data_dtype() == np.float32
        np.testing.assert_array_equal(image.affine, subjects[0].affine)
    np.testing.assert_allclose(subjects[0].affine, summary["affine"])
    assert np.allclose(np.abs(np.diag(subjects[0].affine)[:3]), 3.0)
    assert summary["n_trs"] == TINY.movie_trs == TINY.scan_trs == 240


def test_outside_the_brain_every_value_is_zero(subjects, truth):
    mask = truth["mask"]
    assert mask.sum() == truth["summary"]["n_mask_voxels"] == TINY.mask_voxels
    for image in subjects:
        data = image.get_fdata(dtype=np.float32)
        assert not np.any(data[~mask])
        inside = data[mask]
        assert np.all(inside.std(axis=1) > 0)
        assert 500 <= np.median(inside.mean(axis=1)) <= 1500


def test_noise_only_voxels_carry_no_signal(truth, group_mean):
    kinds = truth["tuning"]["region_kind"]
    noise = kinds == "noise"
    assert 0.10 <= noise.mean() <= 0.20
    assert not np.any(truth["signal"][:, noise])
    assert np.all(np.abs(truth["signal"][:, ~noise]).max(axis=0) > 0)
    regions = truth["tuning"]["region_id"]
    signal_regions = np.unique(regions[~noise])
    region_signals = np.stack([truth["signal"][:, regions == r].mean(axis=1) for r in signal_regions], axis=1)
    r = _z(group_mean[:, noise]).T @ _z(region_signals) / group_mean.shape[0]
    # Autocorrelated noise against slow signals spreads r around 0 (240 TRs); signal voxels sit near 0.65.
    assert abs(r.mean()) < 0.05
    assert np.median(np.abs(r)) < 0.1
    assert truth["ceiling"][noise].max() == 0 and truth["ceiling_empirical"][noise].max() == 0


def test_group_mean_reaches_the_stored_noise_ceiling(truth, group_mean):
    signal_voxels = truth["tuning"]["region_kind"] != "noise"
    measured = np.mean(_z(truth["signal"][:, signal_voxels]) * _z(group_mean[:, signal_voxels]), axis=0)
    np.testing.assert_allclose(measured, truth["ceiling_empirical"][signal_voxels], atol=2e-3)
    analytic = truth["ceiling"][signal_voxels]
    assert 0.5 <= analytic.mean() <= 0.8
    assert abs(measured.mean() - analytic.mean()) < 0.05
    assert np.mean(np.abs(measured - analytic)) < 0.1
    regions = truth["tuning"]["region_id"][signal_voxels]
    for region in np.unique(regions):
        assert abs(measured[regions == region].mean() - analytic[regions == region].mean()) < 0.1


def test_regions_are_contiguous_and_every_kind_is_present(folder, truth):
    tuning = truth["tuning"]
    counts = truth["summary"]["voxel_counts"]
    for kind in ("visual", "auditory", "language", "mixed", "noise"):
        assert counts[kind] >= 0.03 * TINY.mask_voxels, kind
    ijk = tuning["voxel_ijk"]
    for region in np.unique(tuning["region_id"]):
        volume = np.zeros(TINY.grid_shape, dtype=bool)
        volume[tuple(ijk[tuning["region_id"] == region].T)] = True
        labels, n = ndimage.label(volume)
        largest = np.bincount(labels.ravel())[1:].max()
        assert largest >= 0.9 * volume.sum(), f"region {region} is scattered into {n} pieces"
    union = np.zeros(TINY.grid_shape, dtype=int)
    for name in ("region_visual", "region_auditory", "region_language", "region_mixed", "noise_only"):
        union += nib.load(folder / "_truth" / f"{name}.nii.gz").get_fdata().astype(int)
    np.testing.assert_array_equal(union, truth["mask"].astype(int))
    weights = tuning["modality_weights"]
    np.testing.assert_allclose(weights[tuning["region_kind"] != "noise"].sum(axis=1), 1.0, atol=1e-5)
    pure_visual = tuning["region_kind"] == "visual"
    assert np.all(weights[pure_visual, 0] == 1.0)


@pytest.mark.parametrize("modality", ["visual", "auditory", "language"])
def test_response_lags_its_features_by_the_hrf(truth, modality):
    """The region's response follows its best feature about 5 s later and never leads it."""
    response = truth["signal"][:, truth["tuning"]["region_kind"] == modality].mean(axis=1)
    features = truth["features"][f"{modality}_tr"]
    lags = np.arange(-10, 16)
    best_peak, best_lag, best_lead = 0.0, None, None
    for column in features.T:
        if column.std() == 0:
            continue
        correlations = np.abs([_lagged_correlation(response, column, lag) for lag in lags])
        if correlations.max() > best_peak:
            best_peak, best_lag = correlations.max(), lags[correlations.argmax()]
            best_lead = correlations[lags < 0].max()
    assert best_peak > 0.4
    assert 3.0 <= best_lag * TINY.tr_s <= 7.5
    assert best_lead < 0.6 * best_peak


def test_same_seed_gives_identical_data_and_another_seed_different(folder, subjects, truth):
    world = synth._build_world(TINY, 0)
    np.testing.assert_array_equal(world.signal, truth["signal"])
    for subject, image in enumerate(subjects):
        written = image.get_fdata(dtype=np.float32)[truth["mask"]].T
        np.testing.assert_array_equal(synth._subject_series(world, subject), written)
    sheet = load_workbook(folder / "annotations.xlsx", read_only=True).active
    texts = [row[2] for row in list(sheet.iter_rows(values_only=True))[1:]]
    assert texts == [segment.text for segment in world.segments]

    other = synth._build_world(TINY, 1)
    assert [segment.text for segment in other.segments] != texts
    assert not np.array_equal(synth._subject_series(other, 0), synth._subject_series(world, 0))
    assert not np.array_equal(other.signal, world.signal)


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        synthesize(target, "tiny", progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_an_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_movie", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "data", "tiny", progress=False)
    assert list(tmp_path.iterdir()) == []


FAKE_ESPEAK = """
import sys, wave
import numpy as np
path = sys.argv[sys.argv.index("-w") + 1]
samples = (0.5 * 32767 * np.sin(2 * np.pi * 300 * np.arange(3 * 22050) / 22050)).astype("<i2")
with wave.open(path, "wb") as out:
    out.setnchannels(1)
    out.setsampwidth(2)
    out.setframerate(22050)
    out.writeframes(samples.tobytes())
"""


def test_speech_is_spoken_from_each_segment_start_to_its_end_when_espeak_ng_exists(tmp_path, monkeypatch):
    fake = tmp_path / "espeak-ng"
    fake.write_text(f"#!{sys.executable}\n{FAKE_ESPEAK}")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    no_features = np.zeros(len(synth.LANGUAGE_FEATURES))
    segments = [
        synth.Segment(1.0, 2.0, "Ada cooks a meal in the kitchen.", "Ada", "kitchen", "wide", no_features),
        synth.Segment(1.5, 4.0, "Boris reads an old letter in the forest.", "Boris", "forest", "wide", no_features),
    ]
    track = synth._SpeechTrack(segments, 44100)
    sound = np.concatenate([track.render(first, 44100) for first in range(0, 6 * 44100, 44100)])
    assert track.spoken == 2
    assert not sound[:44100].any()
    assert np.abs(sound[44100:2 * 44100]).max() > 0.1
    assert not sound[4 * 44100:].any(), "each sentence stops at its segment's end"


def test_presets_have_the_promised_sizes():
    sherlock = PRESETS["sherlock-scale"]
    assert (sherlock.n_subjects, sherlock.scan_trs, sherlock.grid_shape, sherlock.tr_s) == (17, 1976, (61, 73, 61), 1.5)
    assert (sherlock.frame_width, sherlock.frame_height, sherlock.fps) == (640, 360, 25)
    assert sherlock.movie_trs == 950 < sherlock.scan_trs
    for preset in (PRESETS["tiny"], PRESETS["small"]):
        assert preset.scan_trs == preset.movie_trs
