"""TR-indexed samples: indices into the streams (not copies), targets, splits that never touch, a DDP sampler."""

import numpy as np
import pytest
import torch

from giblet import ops
from giblet.data.dataset import (ShardSampler, WindowDataset, check_split_isolation, text_grid_for, text_slots_for,
                                 window_index)


def test_a_sample_names_its_window_in_each_stream(tiny_store):
    dataset = WindowDataset(tiny_store, "train")
    m = tiny_store.manifest
    lookback, window_s = m["window"]["lookback_s"], m["window"]["window_s"]
    item = dataset[40]
    t = int(item["tr"])
    onset = tiny_store.onsets()[t] - lookback
    assert float(item["window_onset"]) == pytest.approx(onset)
    expected = ops.grid_index(m["video"]["shape"][0], m["video"]["rate_hz"], torch.tensor([onset]), window_s, m["window"]["video_slots"])
    torch.testing.assert_close(item["video_index"], expected[0])
    times = np.asarray(tiny_store.video_times())
    shown = times[item["video_index"][item["video_index"] >= 0].numpy()]
    assert np.all(shown >= onset - 1 / m["video"]["rate_hz"]) and np.all(shown < onset + window_s)
    codes = item["code_index"]
    assert codes.shape == (m["window"]["code_slots"],) and codes.max() < tiny_store.codes().shape[1]
    assert item["mel_index"].shape == (m["window"]["mel_slots"],)
    segment_times = tiny_store.text_times()
    for j in item["text_index"][item["text_index"] >= 0].tolist():
        assert segment_times[j, 0] < onset + window_s and segment_times[j, 1] > onset
    np.testing.assert_array_equal(item["fmri"].numpy(), np.asarray(tiny_store.fmri_mean()[t], dtype=np.float32))
    assert item["fmri"].dtype == torch.float32 and int(item["subject"]) == -1


def test_windows_before_the_movie_are_padded_not_shifted(tiny_store):
    item = WindowDataset(tiny_store, "train")[0]
    assert (item["video_index"] == -1).any(), "the lookback of TR 0 reaches before the movie"
    valid = item["video_index"][item["video_index"] >= 0]
    assert valid.min() == 0


def test_per_subject_mode_has_one_sample_per_subject_and_tr(tiny_store):
    cross = WindowDataset(tiny_store, "val", mode="cross_subject")
    per = WindowDataset(tiny_store, "val", mode="per_subject")
    n_subjects = len(tiny_store.subjects)
    assert len(per) == n_subjects * len(cross)
    batch = per.batch([0, len(cross), len(per) - 1])
    assert batch["subject"].tolist() == [0, 1, n_subjects - 1]
    fmri = tiny_store.fmri()
    t = int(batch["tr"][2])
    np.testing.assert_array_equal(batch["fmri"][2].numpy(), np.asarray(fmri[n_subjects - 1, t], dtype=np.float32))


def test_batch_equals_stacked_items(tiny_store):
    dataset = WindowDataset(tiny_store, "train")
    picks = [5, 0, 17, 5]
    batch = dataset.batch(picks)
    for row, pick in enumerate(picks):
        item = dataset[pick]
        for key, value in item.items():
            torch.testing.assert_close(batch[key][row], value)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_splits_never_share_a_window_or_a_response(tiny_store):
    check_split_isolation(tiny_store)
    m = tiny_store.manifest
    blocks = tiny_store.splits
    tr, lookback = m["alignment"]["tr_s"], m["window"]["lookback_s"]
    onsets = tiny_store.onsets()
    hrf = m["settings"]["window"]["hrf_length_s"]
    for earlier, later in (("train", "val"), ("val", "test")):
        end_of_earlier = onsets[blocks[earlier][1] - 1] + tr
        start_of_later_window = onsets[blocks[later][0]] - lookback
        assert start_of_later_window - end_of_earlier >= hrf - 1e-9


def test_text_slots_take_the_latest_overlapping_segments_in_order():
    starts = np.array([0.0, 2.0, 3.0, 9.0, 20.0])
    ends = np.array([5.0, 2.5, 12.0, 10.0, 21.0])  # overlapping and gapped
    slots = text_slots_for(starts, ends, np.array([0.0, 8.0, 14.0]), 4.0, 3)
    assert slots[0].tolist() == [0, 1, 2]
    assert slots[1].tolist() == [-1, 2, 3]
    assert slots[2].tolist() == [-1, -1, -1]


def test_text_grid_holds_the_segment_shown_at_each_slot_time():
    starts = np.array([0.0, 2.0, 3.0, 9.0, 20.0])
    ends = np.array([5.0, 2.5, 12.0, 10.0, 21.0])
    # Window [0, 4) in 4 slots: times 0.5, 1.5, 2.5, 3.5. Window [8, 12): 8.5 (2), 9.5 (3 started last), 10.5, 11.5.
    grid = text_grid_for(starts, ends, np.array([0.0, 8.0, 13.0]), 4.0, 4)
    assert grid.tolist() == [[0, 0, 0, 2], [2, 3, 2, 2], [-1, -1, -1, -1]]
    # Against a direct search over every segment, on random overlapping and gapped segments.
    rng = np.random.default_rng(0)
    starts = np.sort(rng.uniform(0, 100, 60))
    ends = starts + rng.uniform(0.2, 6.0, 60)
    onsets = rng.uniform(-10, 105, 40)
    grid = text_grid_for(starts, ends, onsets, 9.5, 12)
    times = onsets[:, None] + (np.arange(12) + 0.5) * 9.5 / 12
    covering = (starts[None, None, :] <= times[..., None]) & (ends[None, None, :] > times[..., None])
    expected = np.where(covering.any(axis=2), 59 - np.argmax(covering[..., ::-1], axis=2), -1)
    assert np.array_equal(grid, expected)
    assert (grid >= 0).any() and (grid < 0).any()


def test_shard_sampler_splits_the_epoch_between_ranks():
    n = 10
    shares = [list(ShardSampler(n, rank, 3, shuffle=True, seed=1, pad=True)) for rank in range(3)]
    assert all(len(s) == 4 for s in shares)
    assert set(sum(shares, [])) == set(range(n))
    exact = [list(ShardSampler(n, rank, 3, shuffle=True, seed=1, pad=False)) for rank in range(3)]
    assert sorted(sum(exact, [])) == list(range(n))
    sampler = ShardSampler(n, 0, 1, shuffle=True, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(list(sampler)) == sorted(first)
    assert list(ShardSampler(n, 0, 1, shuffle=True, seed=1)) == first


def test_index_is_computed_once_and_shared(tiny_store):
    index = window_index(tiny_store)
    train = WindowDataset(tiny_store, "train", index=index)
    test = WindowDataset(tiny_store, "test", index=index)
    assert train.index is test.index
    assert index.video.shape == (tiny_store.n_trs, tiny_store.manifest["window"]["video_slots"])


@pytest.mark.parametrize("mode", ["cross_subject", "per_subject"])
def test_blended_targets_mix_each_response_with_the_teachers_row_for_its_tr(tiny_store, mode):
    dataset = WindowDataset(tiny_store, "train", mode)
    items = np.arange(0, len(dataset), 7)
    measured = dataset.batch(items)
    teacher = np.random.default_rng(0).standard_normal((dataset.trs.size, tiny_store.n_voxels)).astype(np.float32)
    dataset.blend_targets(teacher, 0.25)
    blended = dataset.batch(items)
    rows = teacher[blended["tr"].numpy() - dataset.trs[0]]
    np.testing.assert_allclose(blended["fmri"].numpy(), 0.75 * measured["fmri"].numpy() + 0.25 * rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(blended["video_index"], measured["video_index"])  # only the targets change
    with pytest.raises(ValueError, match=r"expected \(%d, %d\)" % (dataset.trs.size, tiny_store.n_voxels)):
        dataset.blend_targets(teacher[1:], 0.5)
    with pytest.raises(ValueError, match=r"teacher weight 1.5; expected a share in \[0, 1\]"):
        dataset.blend_targets(teacher, 1.5)
    # An offset per TR (the linear branch's in-sample minus cross-fitted fit) adds to the blended target.
    offset = np.random.default_rng(1).standard_normal((dataset.trs.size, tiny_store.n_voxels)).astype(np.float32)
    dataset.offset_targets(offset)
    moved = dataset.batch(items)
    np.testing.assert_allclose(moved["fmri"].numpy(), blended["fmri"].numpy() + offset[moved["tr"].numpy() - dataset.trs[0]],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"target offsets have shape"):
        dataset.offset_targets(offset[:, 1:])
