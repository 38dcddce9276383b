"""giblet.data.volume: ROI and label images onto a store's grid (one policy), per-voxel values back to NIfTI."""

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest

from giblet.data import volume
from giblet.errors import DataError

# The store's grid: 2 mm voxels, an x axis that runs right to left (as in LAS files), and a mask that is not a box.
SHAPE = (6, 7, 5)
AFFINE = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -40.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
MASK = np.zeros(SHAPE, dtype=bool)
MASK[1:5, 1:6, 1:4] = True
MASK[1, 1, 1] = False


class FakeStore:
    """What the volume module reads of a store: ``mask()``."""

    def mask(self):
        return MASK.copy(), AFFINE.copy()


def _save(path, values, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(values), affine), str(path))
    return path


def _world(ijk, affine):
    return (affine @ np.r_[np.asarray(ijk, dtype=np.float64), 1.0])[:3]


def test_an_image_on_the_same_grid_is_used_as_is(tmp_path):
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[2, 2:4, 2] = 3
    labels[3, 4, 1:3] = 7
    labels[0, 0, 0] = 9  # outside the mask
    path = _save(tmp_path / "labels.nii.gz", labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same grid: no resampling, no warning
        got = volume.load_labels(path, FakeStore())
        roi = volume.load_roi(path, (MASK, AFFINE + 1e-5))  # affines within the tolerance are the same grid
    assert got.dtype == np.int64 and got.shape == (MASK.sum(),)
    np.testing.assert_array_equal(got, labels[MASK])  # mask order: C order of the mask's voxels
    # Each label lands on its voxel, in the order of the mask's voxels.
    positions = np.argwhere(MASK)
    assert {tuple(p) for p in positions[got == 3]} == {(2, 2, 2), (2, 3, 2)}
    assert {tuple(p) for p in positions[got == 7]} == {(3, 4, 1), (3, 4, 2)}
    np.testing.assert_array_equal(roi, got > 0)


def test_an_image_on_another_grid_is_resampled_nearest_neighbour_with_a_warning(tmp_path):
    # A 1 mm image with its x axis the other way round and an origin off the store's voxel centres (so the nearest
    # voxel is not the one below), each voxel labelled by its own index.
    fine = np.array([[1.0, 0, 0, 17.3], [0, 1.0, 0, -41.6], [0, 0, 1.0, 9.2], [0, 0, 0, 1]])
    shape = (16, 16, 14)
    ids = np.arange(1, np.prod(shape) + 1, dtype=np.int32).reshape(shape)
    path = _save(tmp_path / "fine_labels.nii.gz", ids, fine)
    with pytest.warns(volume.GridWarning) as caught:
        got = volume.load_labels(path, FakeStore())
    message = str(caught[0].message)
    assert "fine_labels.nii.gz" in message and "nearest neighbour" in message
    assert str(shape) in message and str(SHAPE) in message  # both grids
    assert str(fine.tolist()) in message and str(AFFINE.tolist()) in message
    # Every mask voxel takes the label of the image voxel at its centre's position, by the two affines.
    inv = np.linalg.inv(fine)
    for (i, j, k), label in zip(np.argwhere(MASK), got):
        x, y, z = _world((i, j, k), AFFINE)
        source = np.floor((inv @ [x, y, z, 1.0])[:3] + 0.5).astype(int)
        if np.all((source >= 0) & (source < shape)):
            assert label == ids[tuple(source)], (i, j, k)
        else:
            assert label == 0, (i, j, k)
    # Worked by hand: store voxel (2, 3, 2) is at x = 30 - 4 = 26, y = -40 + 6 = -34, z = 10 + 4 = 14 mm,
    # which is at (26 - 17.3, -34 + 41.6, 14 - 9.2) = (8.7, 7.6, 4.8) in the fine image: nearest voxel (9, 8, 5).
    index = int(np.flatnonzero((np.argwhere(MASK) == (2, 3, 2)).all(axis=1))[0])
    assert got[index] == ids[9, 8, 5]
    # The image covers every mask voxel (image x 5..11, y 4..12, z 3..7), and every id is > 0.
    assert (got > 0).all()


def test_voxels_beyond_the_images_field_of_view_are_outside(tmp_path):
    # The same voxel size and orientation, shifted by 2 voxels in x and 3 wide: only store x 2..4 is covered.
    shifted = AFFINE.copy()
    shifted[0, 3] -= 2 * 2.0  # image voxel i is at store voxel i + 2
    path = _save(tmp_path / "narrow.nii.gz", np.ones((3, SHAPE[1], SHAPE[2]), dtype=np.uint8), shifted)
    with pytest.warns(volume.GridWarning):
        roi = volume.load_roi(path, FakeStore())
    x = np.argwhere(MASK)[:, 0]
    np.testing.assert_array_equal(roi, (x >= 2) & (x <= 4))


def test_a_shifted_copy_of_an_roi_selects_the_same_voxels(tmp_path):
    roi = np.zeros(SHAPE, dtype=np.uint8)
    roi[2:4, 2:5, 1:3] = 1
    moved = AFFINE.copy()
    moved[:3, 3] -= AFFINE[:3, 1]  # one voxel further along y
    shifted = np.zeros_like(roi)
    shifted[:, 1:] = roi[:, :-1]
    path = _save(tmp_path / "shifted.nii.gz", shifted, moved)
    with pytest.warns(volume.GridWarning, match="nearest neighbour"):
        got = volume.load_roi(path, FakeStore())
    np.testing.assert_array_equal(got, roi[MASK] > 0)


def test_inside_is_a_label_above_zero_and_nan_is_outside(tmp_path):
    values = np.zeros(SHAPE, dtype=np.float32)
    values[2, 2, 2], values[2, 2, 3], values[3, 3, 3], values[4, 5, 1] = 2.0, -1.0, np.nan, np.inf
    values[3, 2, 2] = 5.0
    path = _save(tmp_path / "signed.nii.gz", values)
    labels = volume.load_labels(path, FakeStore())
    expected = np.zeros(SHAPE, dtype=np.int64)
    expected[2, 2, 2], expected[3, 2, 2] = 2, 5
    np.testing.assert_array_equal(labels, expected[MASK])
    np.testing.assert_array_equal(volume.load_roi(path, FakeStore()), expected[MASK] > 0)
    # An ROI may hold any value > 0 (a probability map); a label image must hold whole numbers.
    values[2, 2, 2] = 0.25
    fractional = _save(tmp_path / "probability.nii.gz", values)
    assert volume.load_roi(fractional, FakeStore()).sum() == 2
    with pytest.raises(DataError, match="non-integer labels") as error:
        volume.load_labels(fractional, FakeStore())
    assert "probability.nii.gz" in str(error.value) and "0.25" in str(error.value)


def test_a_single_volume_4d_image_is_read_as_3d(tmp_path):
    values = np.zeros(SHAPE + (1,), dtype=np.uint8)
    values[2, 2, 2, 0] = 1
    path = _save(tmp_path / "one_volume.nii.gz", values)
    assert volume.load_roi(path, FakeStore()).sum() == 1


def test_errors_name_the_file_what_was_found_and_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="file not found") as error:
        volume.load_roi(tmp_path / "missing.nii.gz", FakeStore())
    assert "missing.nii.gz" in str(error.value) and "3-D NIfTI" in str(error.value)

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a nifti header at all"))
    with pytest.raises(DataError, match="could not read the ROI") as error:
        volume.load_roi(broken, FakeStore())
    assert "broken.nii.gz" in str(error.value)

    series = _save(tmp_path / "series.nii.gz", np.ones(SHAPE + (3,), dtype=np.uint8))
    with pytest.raises(DataError, match="4-D") as error:
        volume.load_labels(series, FakeStore())
    assert "series.nii.gz" in str(error.value) and "(6, 7, 5, 3)" in str(error.value) and "3-D image" in str(error.value)

    outside = _save(tmp_path / "outside.nii.gz", (~MASK).astype(np.uint8))
    with pytest.raises(DataError, match="no voxel inside") as error:
        volume.load_roi(outside, FakeStore())
    message = str(error.value)
    assert "outside.nii.gz" in message and f"{int((~MASK).sum())} voxels > 0" in message and f"{int(MASK.sum())} mask voxels" in message
    with pytest.raises(DataError, match="no voxel inside"):
        volume.load_labels(_save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, dtype=np.uint8)), FakeStore())


def test_values_round_trip_through_a_volume_and_a_nifti(tmp_path):
    rng = np.random.default_rng(0)
    n = int(MASK.sum())
    values = rng.standard_normal(n).astype(np.float32)
    series = rng.standard_normal((n, 4)).astype(np.float32)

    grid = volume.to_volume(values, MASK)
    assert grid.shape == SHAPE and grid.dtype == np.float32 and np.all(grid[~MASK] == 0)
    np.testing.assert_array_equal(volume.from_volume(grid, MASK), values)

    path = volume.save_volume(values, FakeStore(), tmp_path / "r_map.nii.gz")
    image = nib.load(str(path))
    assert image.shape == SHAPE
    np.testing.assert_allclose(image.affine, AFFINE)
    data = np.asarray(image.dataobj)
    assert np.all(data[~MASK] == 0)
    np.testing.assert_array_equal(volume.from_volume(data, MASK), values)
    np.testing.assert_array_equal(volume.read_on_grid(path, FakeStore())[MASK], values)  # read back onto the grid as is

    path = volume.save_volume(series, (MASK, AFFINE), tmp_path / "prediction.nii.gz", tr_s=1.5)
    image = nib.load(str(path))
    assert image.shape == SHAPE + (4,) and image.header.get_zooms()[3] == pytest.approx(1.5)
    np.testing.assert_array_equal(volume.from_volume(np.asarray(image.dataobj), MASK), series)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    with pytest.raises(ValueError, match="one row per mask voxel"):
        volume.to_volume(values[:-1], MASK)
