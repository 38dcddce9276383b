"""giblet.data.parcels: random contiguous parcels, size classes, cube atlases; synth's region labels; `giblet data atlas`."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import pdist
from typer.testing import CliRunner

from giblet.data.parcels import cube_atlas, neighbour_table, random_contiguous_parcels, size_classes
from giblet.data.volume import from_volume, to_volume
from giblet_cli.main import app

runner = CliRunner()


def ellipsoid(shape=(24, 28, 24)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = [(n - 1) / 2 for n in shape]
    return sum(((grid[i] - centre[i]) / (shape[i] / 2)) ** 2 for i in range(3)) < 1


@pytest.fixture(scope="module")
def holey_mask():
    """An ellipsoid with 25% of its voxels removed at random: thin bridges, holes, many small islands."""
    mask = ellipsoid()
    mask &= np.random.default_rng(7).random(mask.shape) > 0.25
    return mask


def components_of(row: np.ndarray, mask: np.ndarray) -> int:
    """Face-connected components of one parcel put back on the grid (the store's voxel order)."""
    _, n = ndimage.label(to_volume(row, mask, dtype=bool))  # default structure: face connectivity
    return n


# --------------------------------------------------------------------------- random_contiguous_parcels


def test_neighbour_table_holds_the_face_neighbours_in_store_order():
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[0, 1, 2] = mask[1, 1, 2] = mask[1, 2, 2] = mask[1, 2, 3] = mask[2, 0, 0] = True
    mask[2, 1, 1] = True  # diagonal to (1, 2, 2) and (2, 0, 0): no face neighbour anywhere
    table = neighbour_table(mask)
    assert table.dtype == np.int32 and table.shape == (6, 6)
    index = {tuple(ijk): i for i, ijk in enumerate(np.argwhere(mask))}  # the order of mask[mask]
    for ijk, i in index.items():
        expected = {index[n] for n in (tuple(np.add(ijk, d)) for d in np.vstack([np.eye(3, dtype=int), -np.eye(3, dtype=int)]))
                    if n in index}
        assert set(table[i][table[i] >= 0].tolist()) == expected, ijk
    assert (table[index[(2, 0, 0)]] == -1).all() and (table[index[(2, 1, 1)]] == -1).all()


@pytest.mark.parametrize("size", [1, 7, 60, 300])
def test_parcels_have_the_exact_size_and_are_one_face_connected_blob_inside_the_mask(holey_mask, size):
    parcels = random_contiguous_parcels(holey_mask, size, 40, seed=1)
    assert parcels.dtype == bool and parcels.shape == (40, int(holey_mask.sum()))
    assert (parcels.sum(axis=1) == size).all()
    for row in parcels:
        volume = to_volume(row, holey_mask, dtype=bool)
        assert not (volume & ~holey_mask).any()
        assert np.array_equal(from_volume(volume, holey_mask), row)
        assert components_of(row, holey_mask) == 1


def test_columns_are_in_the_stores_voxel_order():
    """Two separate boxes; a parcel bigger than the small one must lie in the big one's columns of mask[mask]."""
    mask = np.zeros((12, 6, 6), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels, first in C order
    mask[5:11, 1:5, 1:5] = True  # 96 voxels
    big = np.zeros(mask.shape, dtype=bool)
    big[5:11, 1:5, 1:5] = True
    in_big = big[mask]
    assert not in_big[:8].any() and in_big[8:].all()
    parcels = random_contiguous_parcels(mask, 9, 30, seed=0)
    assert not parcels[:, ~in_big].any()
    assert all(components_of(row, mask) == 1 for row in parcels)
    # A size both boxes hold: seeds are drawn in both (the small one holds 8/104 of the voxels).
    small_hits = random_contiguous_parcels(mask, 8, 300, seed=0)[:, ~in_big].any(axis=1)
    assert 5 <= small_hits.sum() <= 60
    whole = random_contiguous_parcels(mask, 96, 3, seed=0)
    assert np.array_equal(whole, np.tile(in_big, (3, 1)))


def test_parcels_are_deterministic_for_a_seed_and_differ_across_seeds(holey_mask):
    a = random_contiguous_parcels(holey_mask, 50, 20, seed=3)
    assert np.array_equal(a, random_contiguous_parcels(holey_mask, 50, 20, seed=3))
    b = random_contiguous_parcels(holey_mask, 50, 20, seed=4)
    assert not any(np.array_equal(a[i], b[i]) for i in range(20))
    assert len({row.tobytes() for row in a}) == 20  # the parcels of one call differ too


def test_parcels_spread_over_the_mask():
    mask = ellipsoid((12, 14, 12))
    covered = random_contiguous_parcels(mask, 10, 400, seed=0).any(axis=0)
    assert covered.mean() > 0.9


@pytest.mark.parametrize("size", [50, 200])
def test_parcels_are_compact_blobs(size):
    """Mean pairwise distance: far below random voxels', within 1.8x of a ball of the same size (a snake is far longer)."""
    mask = ellipsoid()
    ijk = np.argwhere(mask)
    parcels = random_contiguous_parcels(mask, size, 30, seed=2)
    spread = np.array([pdist(ijk[row]).mean() for row in parcels])
    rng = np.random.default_rng(0)
    scattered = np.array([pdist(ijk[rng.choice(len(ijk), size, replace=False)]).mean() for _ in range(30)])
    cube = np.argwhere(np.ones((15, 15, 15)))
    ball = cube[np.argsort(np.linalg.norm(cube - 7, axis=1), kind="stable")[:size]]
    assert spread.max() < 0.5 * scattered.min()
    assert spread.max() < 1.8 * pdist(ball).mean()


def test_too_small_components_and_bad_sizes_are_value_errors():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0:3, 0:3, 0:3] = True  # 27
    mask[5:7, 5:7, 5:7] = True  # 8
    mask[9, 9, 9] = True
    with pytest.raises(ValueError, match=r"holds 30 voxels: the largest has 27 of the mask's 36"):
        random_contiguous_parcels(mask, 30, 1)
    with pytest.raises(ValueError, match="parcel size 0"):
        random_contiguous_parcels(mask, 0, 1)
    with pytest.raises(ValueError, match="parcel size 37"):
        random_contiguous_parcels(mask, 37, 1)
    with pytest.raises(ValueError, match="3-D"):
        random_contiguous_parcels(mask[0], 2, 1)
    assert random_contiguous_parcels(mask, 27, 0).shape == (0, 36)


# --------------------------------------------------------------------------- size_classes


def test_size_classes_bin_within_the_ratio_in_increasing_order():
    rng = np.random.default_rng(0)
    sizes = np.rint(np.exp(rng.uniform(np.log(5), np.log(3000), 500))).astype(int)
    for ratio in (1.1, 1.25, 2.0):
        class_of, class_sizes = size_classes(sizes.tolist(), ratio)
        assert class_of.shape == (500,) and np.issubdtype(class_of.dtype, np.integer)
        n = class_sizes.size
        assert set(class_of.tolist()) == set(range(n))  # numbered 0..C-1, none empty
        lows = np.array([sizes[class_of == c].min() for c in range(n)])
        highs = np.array([sizes[class_of == c].max() for c in range(n)])
        assert (highs <= ratio * lows).all()
        assert (highs[:-1] < lows[1:]).all()  # increasing size
        means = [np.rint(np.exp(np.log(sizes[class_of == c]).mean())) for c in range(n)]
        assert np.array_equal(class_sizes, means) and (lows <= class_sizes).all() and (class_sizes <= highs).all()
        # Greedy bins: the next class's smallest size would not have fitted the previous class.
        assert (lows[1:] > ratio * lows[:-1]).all()
    assert size_classes(sizes, 1.1)[1].size > size_classes(sizes, 2.0)[1].size


def test_size_classes_small_cases():
    class_of, class_sizes = size_classes([126, 100, 125, 100], 1.25)
    assert class_of.tolist() == [1, 0, 0, 0] and class_sizes.tolist() == [108, 126]
    empty = size_classes([])
    assert empty[0].size == 0 and empty[1].size == 0
    with pytest.raises(ValueError):
        size_classes([10, 0])
    with pytest.raises(ValueError):
        size_classes([10], ratio=1.0)


# --------------------------------------------------------------------------- cube_atlas


@pytest.mark.parametrize("cube", [1, 3, 5])
def test_cube_atlas_labels_every_mask_voxel_once_by_cube(holey_mask, cube):
    atlas = cube_atlas(holey_mask, cube)
    assert atlas.dtype == np.int32 and atlas.shape == holey_mask.shape
    assert (atlas[~holey_mask] == 0).all() and (atlas[holey_mask] > 0).all()
    labels = atlas[holey_mask]
    ijk = np.argwhere(holey_mask) // cube
    cube_keys = {tuple(k) for k in ijk}
    assert np.array_equal(np.unique(labels), np.arange(1, len(cube_keys) + 1))  # consecutive 1..K
    first_of = {}
    for key, label in zip(map(tuple, ijk), labels.tolist()):
        assert first_of.setdefault(label, key) == key  # one cube per label
    assert [first_of[label] for label in range(1, len(cube_keys) + 1)] == sorted(cube_keys)  # C order of the cubes
    sizes = np.bincount(labels)[1:]
    assert sizes.max() <= cube ** 3
    if cube == 1:
        assert np.array_equal(labels, np.arange(1, labels.size + 1))


# --------------------------------------------------------------------------- synth's region labels


def test_synth_writes_the_regions_label_image(tiny_data):
    truth = tiny_data / "_truth"
    regions, brain = nib.load(str(truth / "regions.nii.gz")), nib.load(str(truth / "brain_mask.nii.gz"))
    assert regions.get_data_dtype() == np.int32
    assert regions.shape == brain.shape and np.allclose(regions.affine, brain.affine, atol=0)
    labels = np.asanyarray(regions.dataobj)
    mask = np.asanyarray(brain.dataobj) > 0
    tuning = np.load(truth / "tuning.npz")
    ijk = tuning["voxel_ijk"].astype(np.int64)
    assert np.array_equal(ijk, np.argwhere(mask))
    assert np.array_equal(labels[tuple(ijk.T)], tuning["region_id"] + 1)
    assert (labels[~mask] == 0).all()
    region_labels = json.loads((truth / "truth.json").read_text())["region_labels"]
    assert set(region_labels) == {str(label) for label in np.unique(labels[mask])}
    kinds = tuning["region_kind"]
    for label, kind in region_labels.items():
        assert set(kinds[labels[mask] == int(label)].tolist()) == {kind}
    per_kind = nib.load(str(truth / "region_visual.nii.gz")).get_fdata() > 0
    visual = [int(label) for label, kind in region_labels.items() if kind == "visual"]
    assert np.array_equal(per_kind, np.isin(labels, visual))


# --------------------------------------------------------------------------- giblet data atlas


def test_data_atlas_writes_the_cube_atlas_on_the_stores_grid(tiny_store, tmp_path):
    out = tmp_path / "atlas" / "cubes.nii.gz"
    result = runner.invoke(app, ["data", "atlas", "cubes", str(tiny_store.path), "--size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    mask, affine = tiny_store.mask()
    expected = cube_atlas(mask, 4)
    image = nib.load(str(out))
    assert image.get_data_dtype() == np.int32 and np.allclose(image.affine, affine, atol=1e-6)
    assert np.array_equal(np.asanyarray(image.dataobj), expected)
    sizes = np.bincount(expected[mask])[1:]
    assert f"{sizes.size} parcels" in result.output and f"median size {float(np.median(sizes)):g} voxels" in result.output

    written = out.read_bytes()
    refused = runner.invoke(app, ["data", "atlas", "cubes", str(tiny_store.path), "--size", "2", "--out", str(out)])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--force" in refused.output
    assert out.read_bytes() == written
    forced = runner.invoke(app, ["data", "atlas", "cubes", str(tiny_store.path), "--size", "2", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert np.array_equal(np.asanyarray(nib.load(str(out)).dataobj), cube_atlas(mask, 2))
