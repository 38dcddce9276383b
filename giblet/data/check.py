"""`giblet validate --data`: check a Sherlock-layout folder before any training time is spent.

Every check runs (a failure does not hide the ones after it, where they can still
run) and gives one row: what was checked, pass / warn / FAIL, and the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from giblet.config import Config
from giblet.data import alignment as alignment_mod
from giblet.errors import DataError, GibletError

PASS, WARN, FAIL = "pass", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str


class _Report:
    def __init__(self) -> None:
        self.checks: List[Check] = []

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def fail(self, name: str, error: Exception) -> None:
        self.add(name, FAIL, str(error))


def _range(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low}-{high}"


def check_data(data_dir, config: Config, deep: bool = True, load_models: bool = True, facts: Optional[dict] = None) -> List[Check]:
    """Run every check on ``data_dir``; ``deep`` reads each fMRI file's data, ``load_models`` loads the embedder/EnCodec.

    ``facts``, when given, receives what the checks learnt; ``facts["manifest"]`` the manifest-shaped
    sizes a store of this folder would have (``giblet.models.dims_from_manifest`` turns them into the
    model's data dimensions) when every one of them could be measured.
    """
    facts = {} if facts is None else facts
    from giblet.data import audio, fmri, text, video
    from giblet.data.store import align_sources, check_consistent_headers, check_subject_lengths, find_sources, split_trs

    report = _Report()
    try:
        sources = find_sources(data_dir, config)
    except DataError as error:
        report.fail("layout", error)
        return report.checks
    report.add(
        "layout",
        PASS,
        f"{sources.movie.name}, {sources.annotations.name}, {len(sources.fmri)} fMRI files (subjects {_subjects(sources.subjects)})",
    )

    movie = None
    try:
        movie = video.probe_movie(sources.movie)
        report.add(
            "movie",
            PASS,
            f"{movie.width}x{movie.height} {movie.video_codec}, {movie.fps_fraction} fps ({movie.fps:.3f}), "
            f"{movie.duration_s:.2f} s, ~{movie.n_frames_estimate} frames",
        )
    except GibletError as error:
        report.fail("movie", error)

    if movie is not None:
        if not movie.has_audio:
            status = FAIL if config.audio.features else WARN
            report.add("soundtrack", status, f"{sources.movie}: no audio stream" + ("; audio.features is empty, so it is not needed" if status == WARN else "; set audio.features: [] to train without audio"))
        else:
            gap = abs((movie.audio_duration_s or movie.duration_s) - movie.duration_s)
            status = PASS if gap <= config.alignment.max_stimulus_beyond_s else FAIL
            report.add(
                "soundtrack",
                status,
                f"{movie.audio_codec} {movie.audio_rate} Hz x{movie.audio_channels}, {movie.audio_duration_s or float('nan'):.2f} s "
                f"(video {movie.duration_s:.2f} s, difference {gap:.2f} s, tolerance {config.alignment.max_stimulus_beyond_s:g} s)",
            )

    segments = None
    try:
        t = config.text
        segments = text.read_annotations(sources.annotations, t.start_column, t.end_column, tuple(t.text_columns), t.sheet)
        detail = f"{len(segments.texts)} segments, {segments.starts.min():.1f}-{segments.ends.max():.1f} s" if len(segments.texts) else "0 segments"
        status = PASS if len(segments.texts) else FAIL
        if segments.n_skipped:
            # A segment lost to an empty cell is a gap in the text stream: say which rows, so they can be filled.
            rows = ", ".join(f"{row} ({why})" for row, why in segments.skipped_rows[:8])
            more = f" and {segments.n_skipped - 8} more" if segments.n_skipped > 8 else ""
            detail += f"; {segments.n_skipped} rows skipped: {sources.annotations.name} rows {rows}{more}"
            status = WARN if status == PASS else status
        if movie is not None and len(segments.texts) and segments.starts.min() >= movie.duration_s:
            status, detail = FAIL, detail + f": every segment starts after the movie ends ({movie.duration_s:.1f} s)"
        report.add("annotations", status, detail)
    except GibletError as error:
        report.fail("annotations", error)

    infos = []
    header_ok = True
    for path, subject in zip(sources.fmri, sources.subjects):
        try:
            infos.append(fmri.probe_nifti(path))
        except GibletError as error:
            report.fail(f"fMRI s{subject} header", error)
            header_ok = False
    if infos:
        first = infos[0]
        trs = [i.n_trs for i in infos]
        try:
            check_consistent_headers(infos)
            report.add(
                "fMRI headers",
                PASS if header_ok else FAIL,
                f"{len(infos)} files, grid {tuple(first.shape[:3])}, TR {first.tr_s:g} s, TRs {_range(min(trs), max(trs))}",
            )
        except DataError as error:
            header_ok = False
            report.fail("fMRI headers", error)

    align = None
    if movie is not None and infos and header_ok:
        try:
            align = align_sources(sources, movie, infos, config)
            detail = f"{align.n_trs} TRs used (scan TRs {align.first_tr}-{align.first_tr + align.n_trs - 1})"
            if align.notes:
                detail += "; " + "; ".join(align.notes)
            # A subject cut short is usable (its missing TRs are left out), but the user should know which one.
            short = any(has < align.n_trs for has in align.subject_trs)
            report.add("alignment", WARN if short else PASS, detail)
        except GibletError as error:
            report.fail("alignment", error)

    if align is not None:
        onsets = align.onsets()
        w = config.window
        lookback, window_s = w.lookback_s, w.lookback_s + align.tr_s
        n_frames = int(round(movie.duration_s * movie.fps))
        per_tr = alignment_mod.window_counts(movie.fps, onsets, align.tr_s, n_frames)
        per_window = alignment_mod.window_counts(movie.fps, onsets - lookback, window_s, n_frames)
        report.add(
            "frames per TR",
            PASS if per_tr[0] > 0 else FAIL,
            f"{_range(*per_tr)} per {align.tr_s:g} s TR at {movie.fps:.3f} fps; {_range(*per_window)} per {window_s:g} s window "
            f"(sampled into {w.video_slots} slots)",
        )
        audio_s = movie.audio_duration_s or movie.duration_s
        if "codes" in config.audio.features or movie.has_audio:
            rate = audio.code_rate_hz(config.audio.encodec_model)
            n_codes = int(math.ceil(audio_s * rate))
            low, high = alignment_mod.window_counts(rate, onsets, align.tr_s, n_codes)
            try:
                n_q = audio.n_codebooks(config.audio.bandwidth_kbps, audio.named_architecture(config.audio.encodec_model))
                report.add(
                    "codes per TR",
                    PASS if low > 0 else FAIL,
                    f"{_range(low, high)} EnCodec frames per TR at {rate:g} Hz, {n_q} codebooks at {config.audio.bandwidth_kbps:g} kbps",
                )
            except (GibletError, ValueError) as error:
                report.fail("codes per TR", error)
        if "mel" in config.audio.features and movie.has_audio:
            rate = movie.audio_rate / audio.mel_hop(movie.audio_rate, audio.MEL_RATE_HZ)
            low, high = alignment_mod.window_counts(rate, onsets, align.tr_s, int(audio_s * rate))
            report.add("mel per TR", PASS if low > 0 else FAIL, f"{_range(low, high)} mel frames per TR at {rate:.3f} Hz")
        try:
            blocks, gap_trs = split_trs(align, config, str(data_dir))
            sizes = ", ".join(f"{k} {v[1] - v[0]} (TRs {v[0]}-{v[1] - 1})" for k, v in blocks.items() if v[1] > v[0])
            report.add("splits", PASS, f"{sizes}; gaps of {gap_trs} TRs ({gap_trs * align.tr_s:g} s)")
        except GibletError as error:
            blocks = None
            report.fail("splits", error)
        if blocks is not None:
            try:
                check_subject_lengths(sources, align, blocks)
            except GibletError as error:
                report.fail("subject lengths", error)

    if deep and infos and header_ok:
        facts["n_voxels"] = _check_fmri_data(report, sources, config, align)
        _check_response_lag(report, sources, config, movie, align)

    if load_models:
        try:
            embedder = text.load_embedder(config.text.embedder)
            facts["embedding_size"] = text.embedding_size(embedder)
            report.add("text embedder", PASS, f"{config.text.embedder}: {facts['embedding_size']}-d")
        except GibletError as error:
            report.fail("text embedder", error)
        if "codes" in config.audio.features:
            try:
                model = audio.load_encodec(config.audio.encodec_model, config.audio.bandwidth_kbps)
                report.add("EnCodec", PASS, f"{config.audio.encodec_model}: {model.sample_rate} Hz, {model.frame_rate} Hz codes")
            except GibletError as error:
                report.fail("EnCodec", error)
    if align is not None and facts.get("n_voxels") and facts.get("embedding_size") and passed(report.checks):
        facts["manifest"] = _manifest_sizes(config, align, facts, audio.code_rate_hz(config.audio.encodec_model))
    return report.checks


def _manifest_sizes(config: Config, align, facts: dict, code_rate_hz: float) -> dict:
    """The sizes a store's manifest would hold, from what the checks measured (the data layer stops here:
    the model's dimensions are the models layer's to derive)."""
    from giblet.data.audio import CODEBOOK_SIZE, MEL_RATE_HZ, n_codebooks, named_architecture

    w = config.window
    audio_entry: dict = {"features": list(config.audio.features)}
    if "codes" in config.audio.features:
        n_q = n_codebooks(config.audio.bandwidth_kbps, named_architecture(config.audio.encodec_model))
        audio_entry["codes"] = {"n_codebooks": n_q, "codebook_size": CODEBOOK_SIZE, "rate_hz": code_rate_hz, "start_s": 0.0}
    if "mel" in config.audio.features:
        audio_entry["mel"] = {"n_mels": config.audio.n_mels, "rate_hz": MEL_RATE_HZ, "start_s": 0.0}
    manifest = {
        "window": {**config.section("window")["window"], "window_s": w.lookback_s + align.tr_s, "text_timing": "grid"},
        "video": {"shape": [0, config.video.height, config.video.width, 3]},
        "audio": audio_entry,
        "text": {"embedding_size": facts["embedding_size"]},
        "fmri": {"n_voxels": facts["n_voxels"]},
    }
    return manifest


def _check_fmri_data(report: _Report, sources, config: Config, align) -> Optional[int]:
    """Read every subject once: corrupt files, non-finite values, valid voxels and the shared mask."""
    from giblet.data import fmri
    from giblet.progress import bar

    n_trs = None if align is None else align.first_tr + align.n_trs
    counts: Optional[np.ndarray] = None
    n_ok = 0
    with bar("check fMRI", total=len(sources.fmri)) as progress:
        for path, subject in zip(sources.fmri, sources.subjects):
            try:
                data = fmri.load_subject(path)
                if n_trs is not None:
                    data = data[..., :n_trs]
                finite = np.isfinite(data)
                nonfinite_voxels = int((~finite.all(axis=-1) & finite.any(axis=-1)).sum())
                all_nan = int((~finite.any(axis=-1)).sum())
                del finite
                valid = fmri.valid_voxels(data)
                del data
                n_valid = int(valid.sum())
                status = PASS if n_valid else FAIL
                detail = f"{n_valid} valid voxels"
                if nonfinite_voxels:
                    detail += f", {nonfinite_voxels} voxels with some NaN/inf (excluded)"
                if n_valid == 0:
                    detail = f"{path}: no voxel has finite, non-constant values ({all_nan} all-NaN voxels); expected a BOLD time series"
                report.add(f"fMRI s{subject}", status, detail)
                if n_valid:
                    counts = valid.astype(np.int32) if counts is None else counts + valid
                    n_ok += 1
            except GibletError as error:
                report.fail(f"fMRI s{subject}", error)
            progress.advance(1)
    if counts is not None:
        need = fmri.subjects_required(config.fmri.min_subject_fraction, len(sources.fmri))
        n_mask = int((counts >= need).sum())
        report.add(
            "shared mask",
            PASS if n_mask > 0 and n_ok == len(sources.fmri) else FAIL,
            f"{n_mask} voxels valid in >= {need} of {len(sources.fmri)} subjects ({fmri.VALIDITY_RULE})",
        )
        return n_mask
    return None


def _check_response_lag(report: _Report, sources, config: Config, movie, align) -> None:
    """Does the response follow the sound at a haemodynamic lag? Scans already shifted earlier to absorb the lag
    (as the published Sherlock data were by 3 TRs) respond to the movie at once, and training on them as they
    are delays every HRF-based part twice; ``alignment.preshift_trs`` says they were.

    Cheap (before any GPU time): the soundtrack's loudness per TR (RMS) against the mean z-scored response of
    the first 3 subjects, correlated at lags of -6 to +15 s over the voxels valid in all 3 among 60,000 drawn at
    random from the grid (all of a smaller one; ~19,000 in Sherlock's brain mask); the lag is the peak
    (interpolated between TRs) of the mean lag profile of the 1% of voxels that follow the loudness best. It is
    only read when that profile beats the same statistic with the loudness moved far out of step (8 circular
    shifts); else the check passes as inconclusive. With ``preshift_trs`` P the lag counts P TRs on top. WARN
    below 3 s (an unshifted BOLD response peaks 4-6 s after its cause; the peak is at about 5 s on synthetic
    data) and, with P set, above 8 s (the scans look unshifted).
    """
    name, subjects, positions_drawn, top_fraction, nulls, earliest_s, latest_s, typical_s = (
        "response lag", 3, 60000, 0.01, 8, 3.0, 8.0, 5.0)
    if align is None or movie is None or not movie.has_audio:
        return
    from giblet.data import audio, fmri

    tr, first, preshift = align.tr_s, align.first_tr, config.alignment.preshift_trs
    try:
        samples, rate, start_s = audio.read_audio(sources.movie, progress=False)
        begin = np.clip(np.round((align.onsets() - start_s) * rate).astype(np.int64), 0, samples.size)
        width = max(1, int(round(tr * rate)))
        loudness = np.array([np.sqrt(np.mean(np.square(samples[b:b + width], dtype=np.float64))) if b < samples.size else 0.0
                             for b in begin])
        del samples
        total, valid, n = None, None, align.n_trs
        grid = fmri.probe_nifti(sources.fmri[0]).shape[:3]
        positions = np.random.default_rng(0).permutation(int(np.prod(grid)))[:positions_drawn]
        chosen = np.zeros(int(np.prod(grid)), dtype=bool)
        chosen[positions] = True
        chosen = chosen.reshape(grid)
        for path, has in list(zip(sources.fmri, align.subject_trs))[:subjects]:
            # Only the drawn voxels become float32 (T, voxels); a subject cut short has fewer TRs.
            series = fmri.extract(path, chosen, n_trs=first + has)[first:]
            z, mean, std = fmri.zscore(series, slice(None))
            # fmri.zscore's rule for a constant voxel; a voxel with any non-finite value is left out too.
            varies = np.isfinite(series).all(axis=0) & (std > fmri.CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean)))
            del series
            n = min(n, z.shape[0])
            total = z[:n] if total is None else total[:n] + z[:n]
            valid = varies if valid is None else valid & varies
        total = total[:, valid] if total is not None else None
    except (GibletError, OSError, ValueError) as error:
        report.add(name, WARN, f"not measured ({type(error).__name__}: {error})")
        return
    if total is None or total.shape[1] == 0:
        return
    y = total
    lags = np.arange(int(math.floor(-6.0 / tr)), int(math.ceil(15.0 / tr)) + 1)
    if n < 4 * lags.size:
        report.add(name, PASS, f"not measured: {n} TRs are too few for lags of -6 to +15 s")
        return
    std = y.std(axis=0)
    y = (y - y.mean(axis=0)) / np.where(std > 0, std, 1.0)

    def profile(x: np.ndarray):
        """The top voxels' mean lag profile (each voxel's sign taken at its peak) and its peak value."""
        x = (x - x.mean()) / max(float(x.std()), 1e-12)
        r = np.stack([(x[:n - lag, None] * y[lag:]).mean(axis=0) if lag >= 0 else (x[-lag:, None] * y[:n + lag]).mean(axis=0)
                      for lag in lags])  # (lags, voxels): corr(loudness at t, response at t + lag)
        top = np.argsort(np.abs(r).max(axis=0))[-max(20, int(top_fraction * r.shape[1])):]
        sign = np.sign(r[np.abs(r[:, top]).argmax(axis=0), top])
        curve = (r[:, top] * sign).mean(axis=1)
        return curve, float(curve.max())

    curve, peak_r = profile(loudness[:n])
    null = max(profile(np.roll(loudness[:n], int(shift)))[1] for shift in np.linspace(n // 4, 3 * n // 4, nulls))
    where = f"{min(subjects, len(sources.fmri))} subjects, {y.shape[1]} voxels, {n} TRs"
    if peak_r <= null:
        report.add(name, PASS, f"inconclusive: no voxel follows the soundtrack's loudness beyond chance "
                               f"(r {peak_r:.2f}, out of step {null:.2f}; {where})")
        return
    i = int(curve.argmax())
    offset = 0.0
    if 0 < i < lags.size - 1:  # the parabola through the peak and its neighbours
        a, b, c = curve[i - 1], curve[i], curve[i + 1]
        offset = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0
    apparent_s = float((lags[i] + offset) * tr)
    lag_s = apparent_s + preshift * tr
    detail = (f"the response follows the soundtrack's loudness by {apparent_s:.1f} s"
              + (f" ({lag_s:.1f} s with alignment.preshift_trs: {preshift})" if preshift else "")
              + f" (r {peak_r:.2f}, out of step {null:.2f}; {where})")
    if lag_s < earliest_s:
        guess = max(1, int(round((typical_s - apparent_s) / tr)))
        report.add(name, WARN, f"{detail}: earlier than any haemodynamic lag (4-6 s), so the scans look already shifted "
                               f"earlier by about {guess} TRs ({guess * tr:g} s) to absorb it; set alignment.preshift_trs: "
                               f"{guess} (the published Sherlock data: 3), or the HRF-based parts delay them twice")
    elif preshift and lag_s > latest_s:
        report.add(name, WARN, f"{detail}: later than a haemodynamic lag (4-6 s), as in scans not shifted; "
                               f"check alignment.preshift_trs: {preshift} (0 for scans as acquired)")
    else:
        report.add(name, PASS, detail)


def _subjects(subjects) -> str:
    subjects = list(subjects)
    if len(subjects) > 4 and subjects == list(range(subjects[0], subjects[0] + len(subjects))):
        return f"{subjects[0]}-{subjects[-1]}"
    return ", ".join(str(s) for s in subjects)


def passed(checks: List[Check]) -> bool:
    return all(check.status != FAIL for check in checks)
