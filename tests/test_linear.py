"""Linear encoding models: the per-TR regressors, the FIR / HRF / banded ridges on plain arrays, and their fits
on a store (evaluate's baselines, the trainer's linear branch and teacher)."""

import numpy as np
import pytest
import torch

from giblet.data.alignment import convolve_hrf, fir_delays
from giblet.eval.metrics import pearson_r
from giblet.linear import (BandedRidge, FirRidge, HrfRidge, banded_ridge, convolve_parts, fit_splits,
                           hrf_regressors, linear_prior, regressor_parts)

TR = 1.5
FIT, HELD = slice(0, 240), slice(240, 320)  # one continuous series: fit on its start, predict its end


def close_to(mapped: np.ndarray, predicted: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Mean absolute difference below ``tolerance`` of the predictions' mean spread around their mean."""
    spread = np.abs(predicted - predicted.mean(axis=0)).mean()
    return float(np.abs(mapped - predicted).mean()) < tolerance * spread


def responses(signal: np.ndarray, rng, noise: float = 0.5) -> np.ndarray:
    """``signal`` scaled to unit variance per voxel, plus Gaussian noise: float32."""
    return (signal / signal.std(axis=0) + noise * rng.normal(size=signal.shape)).astype(np.float32)


# --------------------------------------------------------------------------- estimators on plain arrays


def test_the_fir_ridge_learns_a_time_course_per_feature_and_finds_a_delayed_response():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 4))
    w = rng.normal(size=(4, 6))
    clean = np.zeros((320, 6))
    clean[2:] = x[:-2] @ w  # every voxel answers two TRs late
    y = responses(clean, rng, 0.3)
    model = FirRidge(delays=3).fit(x, y, rows=FIT)
    prediction = model.predict(x, rows=HELD)
    assert prediction.shape == (80, 6) and prediction.dtype == np.float32
    assert pearson_r(prediction, y[HELD]).min() > 0.9
    # Without delays the same features explain nothing of a delayed response.
    assert pearson_r(FirRidge(delays=0).fit(x, y, rows=FIT).predict(x, rows=HELD), y[HELD]).mean() < 0.3
    # coef_ rows are delay-major: the weight sits on delay 2, in the shape of the true map.
    coef = model.coef_.reshape(4, 4, 6)  # (delay, feature, voxel)
    norms = np.linalg.norm(coef, axis=(1, 2))
    assert norms.argmax() == 2 and norms[2] > 10 * np.delete(norms, 2).max()
    assert pearson_r(coef[2], w).min() > 0.99  # per voxel, over the features (the responses are scaled per voxel)
    # The primal weights on the delayed raw features reproduce the kernel-form predictions.
    delayed = fir_delays(x, range(4))
    assert close_to(delayed[HELD] @ model.coef_ + model.intercept_, prediction)


def test_the_hrf_ridge_recovers_a_linear_map_through_the_canonical_hrf():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(320, 5))
    w = rng.normal(size=(5, 8))
    y = responses(convolve_hrf(x, TR, "glover") @ w, rng, 0.3)
    model = HrfRidge(TR, "glover").fit(x, y, rows=FIT)
    assert pearson_r(model.predict(x, rows=HELD), y[HELD]).min() > 0.8
    assert model.coef_.shape == (5, 8) and pearson_r(model.coef_, w).min() > 0.98
    assert close_to(convolve_hrf(x, TR, "glover")[HELD] @ model.coef_ + model.intercept_, model.predict(x, rows=HELD))
    # On separate arrays, as with any estimator: the held-out part starts without the TRs before it (zeros),
    # which costs its first rows a little.
    apart = HrfRidge(TR, "glover").fit(x[FIT], y[FIT]).predict(x[HELD])
    assert pearson_r(apart, y[HELD]).mean() > 0.7


def test_the_banded_ridge_gives_each_voxel_the_block_that_drives_it_and_is_one_linear_map():
    """Ten voxels hear a 6-feature block, ten see a 60-feature one; per voxel, the kernel weight goes to its block."""
    rng = np.random.default_rng(2)
    blocks = {"hear": rng.normal(size=(320, 6)), "see": rng.normal(size=(320, 60))}
    heard = convolve_hrf(blocks["hear"], TR, "glover") @ rng.normal(size=(6, 10))
    seen = convolve_hrf(blocks["see"], TR, "glover") @ rng.normal(size=(60, 10))
    y = responses(np.concatenate([heard, seen], axis=1), rng) + 3.0  # an offset: the intercept
    model = BandedRidge(TR, "glover", n_iter=10).fit(blocks, y, rows=FIT)
    assert model.block_weights_.shape == (2, 20)
    np.testing.assert_allclose(model.block_weights_.sum(axis=0), 1.0)
    assert model.block_weights_[0, :10].mean() > 0.8 and model.block_weights_[1, 10:].mean() > 0.8
    assert model.block_shares_ == pytest.approx({"hear": model.block_weights_[0].mean(), "see": model.block_weights_[1].mean()})
    prediction = model.predict(blocks, rows=HELD)
    assert prediction.dtype == np.float32 and pearson_r(prediction, y[HELD]).mean() > 0.75
    # The same fit as one linear map on the blocks through the HRF, side by side: new rows predicted alike.
    weight, bias = model.linear_map()
    regressors = convolve_parts(blocks, TR, "glover")
    assert weight.shape == (66, 20) and bias.shape == (20,) and weight.dtype == bias.dtype == np.float32
    assert close_to(regressors[HELD] @ weight + bias, prediction)
    np.testing.assert_array_equal(model.coef_, weight)
    np.testing.assert_array_equal(model.intercept_, bias)
    # hrf None: the blocks are regressors already; given those same regressors, the same fit.
    convolved = {name: convolve_parts({name: part}, TR, "glover") for name, part in blocks.items()}
    same = BandedRidge(n_iter=10).fit(convolved, y, rows=FIT)
    np.testing.assert_array_equal(same.predict(convolved, rows=HELD), prediction)
    with pytest.raises(ValueError, match="expected the blocks"):
        model.predict({"see": blocks["see"], "hear": blocks["hear"]})
    with pytest.raises(ValueError, match="needs tr_s"):
        BandedRidge(hrf="glover")


# --------------------------------------------------------------------------- on a store


def test_the_regressor_blocks_come_from_the_store_s_frames_read_or_given(tiny_store):
    n = tiny_store.n_trs
    without = regressor_parts(tiny_store, video=False)
    assert set(without) == {"audio", "text"}
    assert without["audio"].shape == (n, tiny_store.manifest["audio"]["mel"]["n_mels"])
    assert without["text"].shape == (n, tiny_store.manifest["text"]["embedding_size"])
    # The frames read from the store, or given as a model holds them (channel-first): the same blocks.
    read = regressor_parts(tiny_store)
    given = regressor_parts(tiny_store, torch.from_numpy(np.asarray(tiny_store.frames())).permute(0, 3, 1, 2))
    assert list(read) == ["video", "audio", "text"] and read["video"].shape == (n, 36)
    for name in given:
        np.testing.assert_array_equal(read[name], given[name])
    # A movie twice as bright (where it does not saturate) doubles the video block and leaves the others.
    dim = torch.from_numpy(np.asarray(tiny_store.frames()) // 2).permute(0, 3, 1, 2)
    halved = regressor_parts(tiny_store, dim)
    assert np.abs(2 * halved["video"] - read["video"]).max() <= 1.001 / 255  # the odd pixel values floor down by 1/255
    np.testing.assert_array_equal(halved["audio"], read["audio"])
    assert all(part.dtype == np.float64 for part in given.values())
    regressors = hrf_regressors(tiny_store, given, "glover")
    assert regressors.shape == (n, sum(part.shape[1] for part in given.values())) and regressors.dtype == np.float32


def test_the_regressor_blocks_of_frames_on_a_device_are_those_of_the_store(tiny_store, device):
    """The trainer passes its model's frame table, which lives on the training device."""
    frames = torch.from_numpy(np.array(tiny_store.frames())).permute(0, 3, 1, 2).to(device)
    on_device, read = regressor_parts(tiny_store, frames), regressor_parts(tiny_store)
    assert all(isinstance(part, np.ndarray) for part in on_device.values())
    np.testing.assert_allclose(on_device["video"], read["video"], rtol=1e-5, atol=1e-6)


def test_the_linear_prior_fits_the_banded_ridge_once_for_the_branch_and_the_teacher(tiny_store):
    parts = regressor_parts(tiny_store, video=False)
    prior = linear_prior(tiny_store, parts, "glover", n_iter=5)
    predictions, shares = banded_ridge(tiny_store, parts, "glover", ("train", "val", "test"), n_iter=5)
    # The teacher is the banded baseline's in-sample fit; the branch is the same model as one linear map.
    np.testing.assert_array_equal(prior.fit, predictions["train"])
    assert prior.shares == shares
    regressors = hrf_regressors(tiny_store, parts, "glover")
    assert prior.weight.shape == (regressors.shape[1], tiny_store.n_voxels) and prior.bias.shape == (tiny_store.n_voxels,)
    for split in ("train", "val", "test"):
        start, stop = tiny_store.splits[split]
        assert close_to(regressors[start:stop] @ prior.weight + prior.bias, predictions[split]), split
    # The teacher and the branch's offset on the training TRs: the same fit's cross-fitted predictions of them.
    start, stop = tiny_store.splits["train"]
    target = np.asarray(tiny_store.fmri_mean(), dtype=np.float32)
    model = BandedRidge(tiny_store.tr_s, "glover", n_iter=5).fit(parts, target, rows=slice(start, stop))
    crossed = model.predict_cross_fitted(target, rows=slice(start, stop))
    # The random search can settle a near-tie differently from one fit to the next (2 of 4,000 voxels once).
    assert np.isclose(prior.cross_fit, crossed, rtol=1e-4, atol=1e-4).all(axis=0).mean() > 0.99
    group = np.asarray(tiny_store.fmri_mean()[start:stop], dtype=np.float32)
    assert pearson_r(prior.cross_fit, group).mean() < pearson_r(prior.fit, group).mean()  # it has not seen them
    only_branch = linear_prior(tiny_store, parts, "glover", teacher=False, n_iter=5)
    assert np.array_equal(only_branch.weight, prior.weight) and np.array_equal(only_branch.cross_fit, prior.cross_fit)
    neither = linear_prior(tiny_store, parts, "glover", branch=False, teacher=False)
    assert neither.weight is None and neither.fit is None and neither.cross_fit is None and neither.shares is None


def test_the_banded_ridge_weighs_each_stream_per_voxel_and_beats_one_kernel_where_one_stream_drives(tiny_store):
    """Voxels driven by the mel block alone, with 384 text dimensions beside it: one shared kernel spends its
    shrinkage on both; the banded ridge gives the audio block the weight and predicts the held-out TRs better."""
    parts = regressor_parts(tiny_store, video=False)  # audio (mel) and text
    rng = np.random.default_rng(0)
    mel = convolve_hrf(parts["audio"], tiny_store.tr_s, "glover")
    mel = (mel - mel.mean(axis=0)) / (mel.std(axis=0) + 1e-9)
    clean = mel @ rng.normal(size=(mel.shape[1], 20)) / np.sqrt(mel.shape[1])
    target = (clean / clean.std(axis=0) + 1.5 * rng.normal(size=clean.shape)).astype(np.float32)
    predictions, shares = banded_ridge(tiny_store, parts, "glover", ("train", "test"), target, n_iter=10)
    start, stop = tiny_store.splits["test"]
    assert predictions["test"].shape == (stop - start, 20) and predictions["test"].dtype == np.float32
    assert predictions["train"].shape[0] == tiny_store.splits["train"][1] - tiny_store.splits["train"][0]
    assert shares["audio"] > 0.7 and shares["audio"] + shares["text"] == pytest.approx(1.0)
    features = np.concatenate(list(parts.values()), axis=1)
    single = fit_splits(tiny_store, HrfRidge(tiny_store.tr_s, "glover"), features, ("test",), target)["test"]
    truth = clean[start:stop].astype(np.float32)
    assert pearson_r(predictions["test"], truth).mean() > pearson_r(single, truth).mean() + 0.05


def test_the_banded_ridge_s_cross_fitted_predictions_hold_each_block_out_of_its_own_fit():
    """Out-of-fold predictions of the fit rows: no noise absorbed where the in-sample fit absorbs it, and each
    block is the ridge (same per-voxel block weights and shrinkage) refit without it and its gap."""
    rng = np.random.default_rng(3)
    n = 300
    blocks = {"a": rng.normal(size=(n, 20)), "b": rng.normal(size=(n, 50))}
    signal = blocks["a"] @ rng.normal(size=(20, 30))
    y = np.concatenate([responses(signal, rng, noise=1.0), rng.normal(size=(n, 30)).astype(np.float32)], axis=1)
    model = BandedRidge(n_iter=10).fit(blocks, y, rows=slice(0, n))
    in_sample = model.predict(blocks, rows=slice(0, n))
    crossed = model.predict_cross_fitted(y, rows=slice(0, n), folds=5, gap=5)
    assert crossed.shape == (n, 60) and crossed.dtype == np.float32
    noise = slice(30, 60)
    assert pearson_r(in_sample[:, noise], y[:, noise]).mean() > 0.2  # the in-sample fit has learnt the noise
    assert abs(pearson_r(crossed[:, noise], y[:, noise]).mean()) < 0.05  # held out, it has not
    assert pearson_r(crossed[:, :30], signal).mean() > 0.9
    # One voxel, one block, solved directly: rows 120-180 from the other rows less 5 each side.
    kernels = np.stack([x.astype(np.float64) @ x.T.astype(np.float64) for x in model.fit_blocks_.values()])
    voxel, keep = 7, np.r_[0:115, 185:n]
    kernel = np.tensordot(np.exp(np.asarray(model.model_.deltas_, dtype=np.float64)[:, voxel]), kernels, axes=1)
    target = y[keep, voxel].astype(np.float64)
    dual = np.linalg.solve(kernel[np.ix_(keep, keep)] + np.eye(keep.size), target - target.mean())
    np.testing.assert_allclose(crossed[120:180, voxel], kernel[120:180][:, keep] @ dual + target.mean(), rtol=1e-4, atol=1e-4)
    # All rows kept, the same solve is the fit itself: the block weights carry the shrinkage as fit chose it.
    whole = kernel @ np.linalg.solve(kernel + np.eye(n), y[:, voxel] - y[:, voxel].mean()) + y[:, voxel].mean()
    np.testing.assert_allclose(whole, in_sample[:, voxel], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="expected the 300 fit rows"):
        model.predict_cross_fitted(y[:40], rows=slice(0, 40))
    short = BandedRidge(n_iter=2).fit(blocks, y, rows=slice(0, 40))
    with pytest.raises(ValueError, match="cannot be cut into 5 folds"):
        short.predict_cross_fitted(y, rows=slice(0, 40))


def test_the_cross_fitted_r_is_pearsons_r_of_each_voxel_whatever_the_block():
    from giblet.data.fmri import pearson_r
    from giblet.linear.fits import cross_fitted_r

    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 23)).astype(np.float32)
    prediction = (0.5 * target + rng.normal(size=target.shape)).astype(np.float32)
    prediction[:, 3] = 1.0  # a constant prediction: r 0
    expected = pearson_r(prediction, target)
    for block in (1, 7, 23, 100):
        np.testing.assert_allclose(cross_fitted_r(target, prediction, block=block), expected, rtol=1e-6, atol=1e-7)
    assert cross_fitted_r(target, prediction)[3] == 0
