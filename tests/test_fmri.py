"""fMRI reading, the shared mask, voxel extraction and train-only z-scoring, on small synthetic NIfTI files.

Files are built like Sherlock's (gzipped 4-D NIfTI, TR 1.5 s, int16 with scl_slope/scl_inter)
on a 6x7x5 grid with 40 TRs.
"""

import gzip

import nibabel as nib
import numpy as np
import pytest

from giblet.data import fmri
from giblet.errors import DataError

GRID = (6, 7, 5)
N_TRS = 40
TR_S = 1.5
AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
SLOPE, INTERCEPT = 0.5, 100.0
NIFTI_HEADER_BYTES = 352


def stored_series(seed, shape=GRID + (N_TRS,)):
    """int16 values as a scanner would store them: a baseline per voxel plus noise over time."""
    rng = np.random.default_rng(seed)
    baseline = rng.integers(500, 1500, size=shape[:3] + (1,))
    return (baseline + rng.integers(-200, 200, size=shape)).astype(np.int16)


def write_scaled_int16(path, stored, slope=SLOPE, intercept=INTERCEPT, tr=TR_S, affine=AFFINE):
    """A .nii.gz whose header carries exactly this slope and intercept (nibabel's writer would pick its own)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(stored.shape)
    header.set_zooms((3.0, 3.0, 3.0, 1.0) if stored.ndim == 4 else (3.0,) * stored.ndim)
    if stored.ndim == 4:
        header["pixdim"][4] = tr  # set directly so that 0 and negative TRs can be written too
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_slope_inter(slope, intercept)
    header["vox_offset"] = NIFTI_HEADER_BYTES
    with gzip.open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * (NIFTI_HEADER_BYTES - handle.tell()))
        handle.write(np.asarray(stored, dtype=np.int16).tobytes(order="F"))
    return path


def write_float32(path, data, tr=TR_S, affine=AFFINE):
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    image.header.set_zooms((3.0, 3.0, 3.0, tr))
    nib.save(image, str(path))
    return path


def subject_data(seed):
    return stored_series(seed).astype(np.float32) * SLOPE + INTERCEPT


# probe_nifti


def test_probe_reads_shape_tr_affine_and_stored_dtype(tmp_path):
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    info = fmri.probe_nifti(path)
    assert info.path == str(path)
    assert info.shape == GRID + (N_TRS,)
    assert info.n_trs == N_TRS
    assert info.tr_s == pytest.approx(TR_S)
    np.testing.assert_allclose(info.affine, AFFINE)
    assert info.dtype == "int16"


def test_probe_reads_the_header_only(tmp_path):
    """A file cut short inside its voxel data still probes: probing never reads the data."""
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[: NIFTI_HEADER_BYTES + 100]))
    assert fmri.probe_nifti(path).shape == GRID + (N_TRS,)


def test_tr_in_milliseconds_is_converted_to_seconds(tmp_path):
    image = nib.Nifti1Image(subject_data(1), AFFINE)
    image.header.set_zooms((3.0, 3.0, 3.0, 1500.0))
    image.header.set_xyzt_units("mm", "msec")
    nib.save(image, str(tmp_path / "ms.nii.gz"))
    assert fmri.probe_nifti(tmp_path / "ms.nii.gz").tr_s == pytest.approx(1.5)


@pytest.mark.parametrize("tr", [0.0, -1.5], ids=["zero", "negative"])
def test_non_positive_tr_is_rejected(tmp_path, tr):
    path = write_scaled_int16(tmp_path / "bad_tr.nii.gz", stored_series(1), tr=tr)
    with pytest.raises(DataError, match="expected TR in seconds in zooms\\[3\\]") as caught:
        fmri.probe_nifti(path)
    assert str(path) in str(caught.value)


def test_three_dimensional_image_is_rejected(tmp_path):
    path = write_scaled_int16(tmp_path / "anat.nii.gz", stored_series(1)[..., 0])
    with pytest.raises(DataError, match=r"3-D with shape \(6, 7, 5\); expected a 4-D") as caught:
        fmri.probe_nifti(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="s9.nii.gz: fMRI file not found"):
        fmri.probe_nifti(tmp_path / "s9.nii.gz")


def test_garbage_nii_gz_is_named(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not a gzip stream" * 20)
    with pytest.raises(DataError) as caught:
        fmri.probe_nifti(path)
    assert str(caught.value).startswith(f"{path}: could not read the NIfTI header")


# load_subject


def test_load_subject_applies_slope_and_intercept_in_float32(tmp_path):
    stored = stored_series(1)
    data = fmri.load_subject(write_scaled_int16(tmp_path / "s1.nii.gz", stored))
    assert data.dtype == np.float32
    assert data.shape == GRID + (N_TRS,)
    np.testing.assert_array_equal(data, stored.astype(np.float32) * np.float32(SLOPE) + np.float32(INTERCEPT))


def test_load_subject_float32_file_is_returned_as_stored(tmp_path):
    values = np.random.default_rng(0).normal(size=GRID + (N_TRS,)).astype(np.float32)
    data = fmri.load_subject(write_float32(tmp_path / "f.nii.gz", values))
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, values)


def test_truncated_gzip_is_named_when_the_data_is_read(tmp_path):
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DataError, match="could not decompress the image data") as caught:
        fmri.load_subject(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "expected a valid gzip NIfTI" in message


# valid_voxels and shared_mask


def test_validity_rule_is_one_documented_sentence():
    assert "finite at every TR" in fmri.VALIDITY_RULE and "constant" in fmri.VALIDITY_RULE


def test_valid_voxels_rejects_non_finite_and_constant_voxels():
    data = subject_data(1)
    data[0, 0, 0, 7] = np.nan
    data[1, 0, 0, 3] = np.inf
    data[2, 0, 0, :] = 1234.5
    valid = fmri.valid_voxels(data)
    assert valid.dtype == bool and valid.shape == GRID
    assert not valid[0, 0, 0] and not valid[1, 0, 0] and not valid[2, 0, 0]
    assert valid.sum() == np.prod(GRID) - 3


def test_valid_voxels_is_the_same_one_z_slice_at_a_time(monkeypatch):
    data = subject_data(1)
    data[3, 4, 2, :] = 7.0
    whole = fmri.valid_voxels(data)
    monkeypatch.setattr(fmri, "_CHUNK_BYTES", 1)
    np.testing.assert_array_equal(fmri.valid_voxels(data), whole)


def test_shared_mask_keeps_voxels_valid_in_every_subject_by_default(tmp_path):
    constant_voxel = (2, 3, 1)
    first = stored_series(1)
    second = stored_series(2)
    second[constant_voxel] = 900
    paths = [write_scaled_int16(tmp_path / "s1.nii.gz", first), write_scaled_int16(tmp_path / "s2.nii.gz", second)]

    mask, valid_per_subject = fmri.shared_mask(paths, progress=False)
    assert mask.dtype == bool and mask.shape == GRID
    assert not mask[constant_voxel]
    assert mask.sum() == np.prod(GRID) - 1
    assert valid_per_subject == [np.prod(GRID), np.prod(GRID) - 1]

    half_mask, _ = fmri.shared_mask(paths, min_fraction=0.5, progress=False)
    assert half_mask[constant_voxel]
    assert half_mask.all()


def test_shared_mask_looks_only_at_the_first_n_trs(tmp_path):
    late_starter = (1, 1, 1)
    stored = stored_series(1)
    stored[late_starter + (slice(0, 20),)] = 1000
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored)
    assert fmri.shared_mask([path], progress=False)[0][late_starter]
    assert not fmri.shared_mask([path], n_trs=20, progress=False)[0][late_starter]


@pytest.mark.parametrize("fill", [np.nan, 5.0], ids=["nan-only", "constant"])
def test_subject_without_a_valid_voxel_is_named(tmp_path, fill):
    good = write_float32(tmp_path / "s1.nii.gz", subject_data(1))
    bad = write_float32(tmp_path / "s2.nii.gz", np.full(GRID + (N_TRS,), fill, dtype=np.float32))
    with pytest.raises(DataError, match="no voxel has finite, non-constant values") as caught:
        fmri.shared_mask([good, bad], progress=False)
    assert str(caught.value).startswith(str(bad))


def test_subjects_on_different_grids_are_rejected(tmp_path):
    first = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    other = write_scaled_int16(tmp_path / "s2.nii.gz", stored_series(2, shape=(6, 7, 4, N_TRS)))
    expected = r"voxel grid is \(6, 7, 4\); expected the first subject's grid \(6, 7, 5\)"
    with pytest.raises(DataError, match=expected) as caught:
        fmri.shared_mask([first, other], progress=False)
    assert str(caught.value).startswith(str(other))


def test_subjects_with_different_affines_are_rejected(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 3.0
    first = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    other = write_scaled_int16(tmp_path / "s2.nii.gz", stored_series(2), affine=shifted)
    with pytest.raises(DataError, match="expected the first subject's affine") as caught:
        fmri.shared_mask([first, other], progress=False)
    assert str(caught.value).startswith(str(other))
    assert "90.0" in str(caught.value)


# extract


def test_extract_returns_mask_voxels_in_c_order(tmp_path):
    stored = stored_series(1)
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored)
    data = fmri.load_subject(path)
    mask = np.zeros(GRID, dtype=bool)
    for voxel in [(5, 0, 0), (0, 6, 4), (0, 0, 1), (3, 2, 2)]:
        mask[voxel] = True

    series = fmri.extract(path, mask)
    assert series.dtype == np.float32 and series.shape == (N_TRS, 4)
    assert series.flags.c_contiguous
    for column, voxel in enumerate(np.argwhere(mask)):
        np.testing.assert_array_equal(series[:, column], data[tuple(voxel)])
    np.testing.assert_array_equal(fmri.extract(path, mask, n_trs=10), series[:10])


def test_extract_rejects_a_mask_on_another_grid(tmp_path):
    path = write_scaled_int16(tmp_path / "s1.nii.gz", stored_series(1))
    with pytest.raises(DataError, match=r"voxel grid is \(6, 7, 5\); expected the mask's grid \(6, 7, 4\)"):
        fmri.extract(path, np.ones((6, 7, 4), dtype=bool))


# zscore


def series_with_a_constant_voxel():
    series = np.random.default_rng(3).normal(50.0, 4.0, size=(N_TRS, 6)).astype(np.float32)
    series[:, 2] = 42.0
    return series


def test_zscore_train_part_has_mean_0_and_std_1():
    z, mean, std = fmri.zscore(series_with_a_constant_voxel(), slice(0, 30))
    assert z.dtype == np.float32 and z.shape == (N_TRS, 6)
    varying = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(z[:30, varying].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:30, varying].std(axis=0), 1.0, atol=1e-5)
    assert mean.shape == std.shape == (6,)


def test_zscore_statistics_ignore_test_trs():
    series = series_with_a_constant_voxel()
    z, mean, std = fmri.zscore(series, slice(0, 30))
    changed = series.copy()
    changed[30:] = changed[30:] * 10 + 1000
    z_changed, mean_changed, std_changed = fmri.zscore(changed, slice(0, 30))
    np.testing.assert_array_equal(mean_changed, mean)
    np.testing.assert_array_equal(std_changed, std)
    np.testing.assert_array_equal(z_changed[:30], z[:30])


def test_zscore_accepts_bool_and_integer_train_indices():
    series = series_with_a_constant_voxel()
    by_slice = fmri.zscore(series, slice(0, 30))
    train = np.zeros(N_TRS, dtype=bool)
    train[:30] = True
    for index in (train, np.arange(30)):
        for expected, got in zip(by_slice, fmri.zscore(series, index)):
            np.testing.assert_array_equal(got, expected)


def test_zscore_constant_and_non_finite_values_become_0():
    series = series_with_a_constant_voxel()
    series[35, 4] = np.nan
    z, _, std = fmri.zscore(series, slice(0, 30))
    assert np.isfinite(z).all()
    assert std[2] == 0.0
    assert (z[:, 2] == 0).all()
    assert z[35, 4] == 0.0


# mask files


def test_mask_round_trips_as_uint8_nifti(tmp_path):
    mask = np.random.default_rng(4).random(GRID) > 0.5
    path = tmp_path / "store" / "mask.nii.gz"
    fmri.write_mask(mask, AFFINE, path)
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    loaded, affine = fmri.load_mask(path)
    assert loaded.dtype == bool
    np.testing.assert_array_equal(loaded, mask)
    np.testing.assert_allclose(affine, AFFINE)
