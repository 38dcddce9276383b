"""Scans already shifted earlier to absorb the haemodynamic lag (alignment.preshift_trs): the HRF-based parts
advance the HRF instead of delaying it again, validate says when data look shifted, and the same synthetic
dataset written shifted and unshifted gives the same linear figures once the setting says so."""

import numpy as np
import pytest

from giblet.config import Config, from_dict, load_config
from giblet.data.alignment import convolve_hrf
from giblet.data.check import PASS, WARN, check_data
from giblet.errors import ConfigError
from giblet.linear import (BandedRidge, HrfRidge, banded_ridge, convolve_parts, fit_splits, hrf_convolve,
                           hrf_regressors, regressor_parts)

TR = 1.5
SHIFT = 3
# The stores of this file: mel only (the linear parts read the mel bands), the demo's lookback.
SETTINGS = {"window": {"lookback_s": 8.0}}


def test_the_advanced_hrf_is_the_unshifted_response_moved_earlier_by_the_preshift():
    impulse = np.zeros((200, 2))
    impulse[50, 0] = 1.0
    impulse[120, 1] = 2.0
    plain = convolve_hrf(impulse, TR)
    advanced = hrf_convolve(impulse, TR, "glover", SHIFT)
    assert advanced.shape == plain.shape
    np.testing.assert_allclose(advanced[:-SHIFT], plain[SHIFT:], atol=1e-12)
    # The unshifted response to TR 50 peaks at TR 53-54 and is 0 up to TR 50; the shifted scans show it 3 TRs early,
    # the whole of it (nothing cut off): it starts right after TR 47 and holds the response's full area.
    assert int(np.argmax(plain[:, 0])) in (53, 54) and int(np.argmax(advanced[:, 0])) in (50, 51)
    assert np.all(advanced[:48, 0] == 0) and advanced[48, 0] > 0
    np.testing.assert_allclose(advanced[:, 0].sum(), plain[:, 0].sum(), rtol=1e-12)
    np.testing.assert_array_equal(hrf_convolve(impulse, TR, "glover", 0), plain)
    # The last rows read the features past the end, held at the last row's.
    steady = np.ones((80, 1))
    np.testing.assert_allclose(hrf_convolve(steady, TR, "glover", SHIFT)[-1], convolve_hrf(np.ones((83, 1)), TR)[-1])
    with pytest.raises(ValueError, match="preshift_trs"):
        hrf_convolve(impulse, TR, "glover", -1)


def test_every_hrf_based_estimator_uses_the_advanced_hrf():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    expected = hrf_convolve(x, TR, "glover", SHIFT)
    np.testing.assert_allclose(HrfRidge(TR, "glover", preshift_trs=SHIFT)._filter(x), expected)
    np.testing.assert_allclose(HrfRidge(TR, "glover")._filter(x), convolve_hrf(x, TR))  # None on plain arrays: 0
    np.testing.assert_allclose(convolve_parts({"a": x}, TR, "glover", SHIFT), expected.astype(np.float32))
    np.testing.assert_allclose(BandedRidge(TR, "glover", preshift_trs=SHIFT)._regressors("a", x), expected, rtol=1e-6)


def test_the_setting_is_checked_and_keeps_the_keys_of_stores_made_before_it():
    assert Config().alignment.preshift_trs == 0 and load_config(None).alignment.preshift_trs == 0
    assert from_dict({"alignment": {"preshift_trs": 3}}).alignment.preshift_trs == 3
    with pytest.raises(ConfigError, match="alignment.preshift_trs is -1; expected the TRs"):
        from_dict({"alignment": {"preshift_trs": -1}}, "c.yaml")
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict({"alignment": {"preshift_trs": 4.5}}, "c.yaml")
    with pytest.raises(ConfigError, match="did you mean 'alignment.preshift_trs'"):
        from_dict({"alignment": {"preshift_tr": 3}}, "c.yaml")
    # At 0 the setting is left out of a store's settings (and key): a store prepared before it is still reused.
    assert set(Config().section("alignment")["alignment"]) == {"stimulus_onset_s", "max_stimulus_beyond_s",
                                                              "max_fmri_beyond_s", "hrf"}
    shifted = from_dict({"alignment": {"preshift_trs": 3}}).section("alignment")["alignment"]
    assert shifted["preshift_trs"] == 3


@pytest.fixture(scope="module")
def shifted_data(tmp_path_factory):
    """The `tiny` dataset of the tests (seed 0) with its fMRI written shifted earlier by 3 TRs."""
    from giblet.data.synth import preset_variant, synthesize

    return synthesize(tmp_path_factory.mktemp("preshift") / "tiny-shifted", preset_variant("tiny", preshift_trs=SHIFT),
                      seed=0, progress=False)


@pytest.fixture(scope="module")
def stores(tiny_data, shifted_data, tmp_path_factory):
    """Unshifted; shifted without the setting; shifted with alignment.preshift_trs: 3."""
    from giblet.data.store import prepare

    folder = tmp_path_factory.mktemp("preshift_stores")
    plain, told = from_dict(SETTINGS), from_dict({**SETTINGS, "alignment": {"preshift_trs": SHIFT}})
    return {
        "unshifted": prepare(tiny_data, plain, folder / "unshifted", progress=False),
        "shifted, not set": prepare(shifted_data, plain, folder / "shifted", progress=False),
        "shifted, set": prepare(shifted_data, told, folder / "shifted-set", progress=False),
    }


def test_the_synthetic_fmri_is_written_shifted(tiny_data, shifted_data):
    import json

    plain, shifted = np.load(tiny_data / "_truth" / "signal.npy"), np.load(shifted_data / "_truth" / "signal.npy")
    assert plain.shape == shifted.shape
    carries = plain.std(axis=0) > 0
    # Row t of the shifted files is the response at TR t + 3 (the amplitude is rescaled over the movie's rows).
    r = [np.corrcoef(plain[SHIFT:, v], shifted[:-SHIFT, v])[0, 1] for v in np.flatnonzero(carries)[:40]]
    assert min(r) > 0.9999
    assert json.loads((shifted_data / "_truth" / "truth.json").read_text())["preshift_trs"] == SHIFT


def test_the_stores_regressors_are_the_unshifted_ones_moved_earlier(stores):
    plain, told = stores["unshifted"], stores["shifted, set"]
    assert told.preshift_trs == SHIFT and plain.preshift_trs == 0
    assert "preshift_trs" not in plain.manifest["settings"]["alignment"]
    # Same movie, same features; the shifted store's regressors at TR t are the unshifted ones at t + 3.
    parts = regressor_parts(plain)
    np.testing.assert_allclose(hrf_regressors(told, parts, "glover")[:-SHIFT], hrf_regressors(plain, parts, "glover")[SHIFT:],
                               atol=1e-6)
    # An estimator fit on a store takes its setting.
    model = HrfRidge(told.tr_s, "glover")
    fit_splits(told, model, np.concatenate(list(parts.values()), axis=1), ("test",))
    assert model.preshift_trs == SHIFT


def test_the_window_of_a_shifted_tr_is_the_window_of_the_tr_it_was_acquired_at(stores):
    from giblet.data.dataset import window_index

    plain, told = window_index(stores["unshifted"]), window_index(stores["shifted, set"])
    # Row t of the shifted scans is the response acquired at TR t + 3: it reads that TR's stimulus window.
    np.testing.assert_allclose(told.window_onsets[:-SHIFT], plain.window_onsets[SHIFT:])
    np.testing.assert_array_equal(told.video[:-SHIFT], plain.video[SHIFT:])
    np.testing.assert_array_equal(told.text[:-SHIFT], plain.text[SHIFT:])


def _linear_figures(store):
    """ridge_hrf and ridge_banded as giblet evaluate fits them: the mean over the validation and test blocks of
    the fraction of the noise-free ceiling on the signal voxels."""
    from giblet.eval.evaluate import truth_metrics
    from giblet.eval.metrics import pearson_r

    parts = regressor_parts(store)
    group = np.asarray(store.fmri_mean(), dtype=np.float32)
    splits = ("val", "test")
    fits = {"ridge_hrf": fit_splits(store, HrfRidge(store.tr_s, "glover"), np.concatenate(list(parts.values()), axis=1),
                                    splits, group),
            "ridge_banded": banded_ridge(store, parts, "glover", splits, group)[0]}
    figures = {}
    for name, predictions in fits.items():
        fractions = []
        for split in splits:
            start, stop = store.splits[split]
            r = pearson_r(predictions[split], group[start:stop])
            fractions.append(truth_metrics(store, split, {name: r})[name]["fraction_of_ceiling"])
        figures[name] = float(np.mean(fractions))
    return figures


@pytest.mark.slow  # synthesizes the shifted dataset and prepares three stores
def test_shifted_scans_with_the_setting_give_the_unshifted_figures(stores):
    figures = {name: _linear_figures(store) for name, store in stores.items()}
    # Measured (ridge_hrf / ridge_banded): unshifted 0.187 / 0.339, shifted and set 0.198 / 0.341, shifted and not
    # set 0.084 / 0.049. The two datasets share the noise but not the stimulus stretch of each 24-TR block.
    for name in ("ridge_hrf", "ridge_banded"):
        unshifted, told, untold = (figures[k][name] for k in ("unshifted", "shifted, set", "shifted, not set"))
        assert abs(told - unshifted) < 0.05, figures
        # The same tolerance fails without the setting: the HRF then delays the shifted responses a second time.
        assert abs(untold - unshifted) > 0.05 and untold < unshifted, figures


def test_validate_warns_when_the_response_peaks_before_any_plausible_lag(tiny_data, shifted_data):
    def lag_check(data, settings):
        checks = check_data(data, from_dict(settings), load_models=False)
        return next(c for c in checks if c.name == "response lag")

    shifted = lag_check(shifted_data, SETTINGS)
    assert shifted.status == WARN and "alignment.preshift_trs: 3" in shifted.detail and "shifted" in shifted.detail
    plain = lag_check(tiny_data, SETTINGS)
    assert plain.status == PASS, plain.detail
    told = lag_check(shifted_data, {**SETTINGS, "alignment": {"preshift_trs": SHIFT}})
    assert told.status == PASS, told.detail
    # The setting on unshifted scans: the response then looks too late.
    wrong = lag_check(tiny_data, {**SETTINGS, "alignment": {"preshift_trs": SHIFT}})
    assert wrong.status == WARN and "check alignment.preshift_trs: 3" in wrong.detail
