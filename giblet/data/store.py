"""The prepared store: every stimulus stream once, the fMRI as one memory-mapped array, and a manifest.

``prepare(data_dir, config, out)`` writes, in a temporary folder beside ``out``
that is renamed into place at the end (a crash leaves no half store)::

    manifest.json          schema version, key, source hashes, settings, every shape, rate and dtype
    video_frames.bin       uint8 (n_frames, H, W, 3), a regular stream at the movie's frame rate
    video_times.npy        float64 (n_frames,) presentation time of each stored frame (seconds, PTS)
    audio_codes.npy        int16 (n_codebooks, n_code_frames) EnCodec codes        [audio.features has codes]
    audio_mel.npy          float16 (n_mel_frames, n_mels) log-mel                   [audio.features has mel]
    text_embeddings.npy    float16 (n_segments, embedding_size), L2-normalised
    text_times.npy         float64 (n_segments, 2) start and end seconds
    text.json              the segment texts
    fmri.bin               float16 (n_subjects, n_trs, n_voxels), z-scored per subject with train-TR statistics
    fmri_mean.bin          float16 (n_trs, n_voxels), the mean of the z-scored subjects
    mask.nii.gz            the shared voxel mask (voxel order = C order of this mask)

The store is keyed by a hash of the input files and of every setting that
changes its content; preparing again with the same inputs and settings reuses it,
and any change makes a new one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from giblet.version import __version__
from giblet.config import STORE_SECTIONS, Config, differences
from giblet.data import alignment as alignment_mod
from giblet.data.splits import split_blocks
from giblet.errors import DataError
from giblet.progress import bar

log = logging.getLogger("giblet.data")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 22


# --------------------------------------------------------------------------- inputs


@dataclass
class Sources:
    movie: Path
    annotations: Path
    fmri: List[Path]
    subjects: List[int]


def _subject_number(path: Path) -> int:
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else -1


def find_sources(data_dir: Union[str, Path], config: Config) -> Sources:
    """The files of a Sherlock-layout folder, each checked to exist."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "folder not found", expected="a folder in the Sherlock layout (see `giblet data synth`)")
    movie = data_dir / config.data.movie
    annotations = data_dir / config.data.annotations
    for path, key in ((movie, "data.movie"), (annotations, "data.annotations")):
        if not path.is_file():
            raise DataError(path, "file not found", expected=f"the file named by {key}", fix=f"add it or set {key}")
    fmri = sorted(data_dir.glob(config.data.fmri), key=lambda p: (_subject_number(p), p.name))
    if not fmri:
        raise DataError(
            data_dir / config.data.fmri,
            "no fMRI file matches",
            expected="one 4-D NIfTI per subject, e.g. sherlock_nii/sherlock_movie_s1.nii.gz",
            fix="add the files or set data.fmri to a glob that matches them",
        )
    subjects = [_subject_number(p) for p in fmri]
    if config.data.subjects is not None:
        wanted = list(config.data.subjects)
        missing = [s for s in wanted if s not in subjects]
        if missing:
            raise DataError(
                data_dir / config.data.fmri,
                f"no file for subject(s) {missing}",
                expected=f"subjects among {subjects}",
                fix="fix data.subjects",
            )
        keep = [subjects.index(s) for s in wanted]
        fmri = [fmri[i] for i in keep]
        subjects = wanted
    return Sources(movie, annotations, fmri, subjects)


def file_digest(path: Path, known: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Size, mtime and sha256 of a file; the sha256 is reused from ``known`` when size and mtime match."""
    stat = path.stat()
    entry = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns and known.get("sha256"):
        entry["sha256"] = known["sha256"]
        return entry
    from giblet.data.integrity import sha256_file

    entry["sha256"] = sha256_file(path, chunk=HASH_CHUNK)
    return entry


def _source_digests(sources: Sources, known: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    known = known or {}
    known_fmri = {entry["path"]: entry for entry in known.get("fmri", [])}
    return {
        "movie": file_digest(sources.movie, known.get("movie")),
        "annotations": file_digest(sources.annotations, known.get("annotations")),
        "fmri": [
            dict(file_digest(path, known_fmri.get(str(path))), subject=subject)
            for path, subject in zip(sources.fmri, sources.subjects)
        ],
    }


def store_key(digests: Dict[str, Any], config: Config) -> str:
    """Hash of the input files' contents and of every setting that changes the store."""
    content = {
        "schema_version": SCHEMA_VERSION,
        "sources": {
            "movie": digests["movie"]["sha256"],
            "annotations": digests["annotations"]["sha256"],
            "fmri": [(entry["subject"], entry["sha256"]) for entry in digests["fmri"]],
        },
        "settings": config.section(*STORE_SECTIONS),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- reading a store


@dataclass
class Store:
    """A prepared store, opened read-only; arrays are memory-mapped, nothing is copied."""

    path: Path
    manifest: Dict[str, Any]

    def _array(self, entry: Dict[str, Any]) -> np.ndarray:
        file = self.path / entry["file"]
        if file.suffix == ".npy":
            return np.load(file, mmap_mode="r")
        return np.memmap(file, dtype=entry["dtype"], mode="r", shape=tuple(entry["shape"]))

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def tr_s(self) -> float:
        return self.manifest["alignment"]["tr_s"]

    @property
    def n_trs(self) -> int:
        return self.manifest["alignment"]["n_trs"]

    @property
    def n_voxels(self) -> int:
        return self.manifest["fmri"]["n_voxels"]

    @property
    def preshift_trs(self) -> int:
        """``alignment.preshift_trs`` of the settings the store was prepared with: by how many TRs its scans were
        already shifted earlier to absorb the haemodynamic lag (0 when the setting is absent: older stores)."""
        return int(self.manifest.get("settings", {}).get("alignment", {}).get("preshift_trs", 0))

    @property
    def subjects(self) -> List[int]:
        return self.manifest["fmri"]["subjects"]

    @property
    def splits(self) -> Dict[str, tuple]:
        return {name: tuple(block) for name, block in self.manifest["splits"]["blocks"].items()}

    def onsets(self) -> np.ndarray:
        """Stimulus-clock start of each stored TR (float64 seconds)."""
        a = self.manifest["alignment"]
        return alignment_mod.tr_onsets(a["n_trs"], a["tr_s"], a["stimulus_onset_s"], a["first_tr"])

    def frames(self) -> np.ndarray:
        return self._array(self.manifest["video"])

    def video_times(self) -> np.ndarray:
        return np.load(self.path / self.manifest["video"]["times_file"], mmap_mode="r")

    def codes(self) -> Optional[np.ndarray]:
        entry = self.manifest["audio"].get("codes")
        return None if entry is None else self._array(entry)

    def mel(self) -> Optional[np.ndarray]:
        entry = self.manifest["audio"].get("mel")
        return None if entry is None else self._array(entry)

    def text_embeddings(self) -> np.ndarray:
        return self._array(self.manifest["text"])

    def text_times(self) -> np.ndarray:
        return np.load(self.path / self.manifest["text"]["times_file"])

    def texts(self) -> List[str]:
        return json.loads((self.path / self.manifest["text"]["texts_file"]).read_text())

    def fmri(self) -> np.ndarray:
        """(n_subjects, n_trs, n_voxels) z-scored responses; TRs a subject lacks (``present``) hold 0."""
        return self._array(self.manifest["fmri"])

    @property
    def subject_trs(self) -> List[int]:
        """How many store TRs each subject has: a subject cut short has TRs ``0 .. subject_trs[s] - 1``."""
        return list(self.manifest["fmri"].get("subject_trs") or [self.n_trs] * len(self.subjects))

    def present(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """(n_subjects, stop - start) bool: which subject has which of the store TRs ``start .. stop - 1``."""
        stop = self.n_trs if stop is None else stop
        return np.arange(start, stop)[None, :] < np.asarray(self.subject_trs)[:, None]

    def fmri_mean(self) -> np.ndarray:
        """(n_trs, n_voxels) mean of the z-scored subjects that have each TR."""
        entry = self.manifest["fmri"]
        return np.memmap(self.path / entry["mean_file"], dtype=entry["dtype"], mode="r", shape=tuple(entry["shape"][1:]))

    @property
    def space(self) -> str:
        """``mni`` when the scans' header says MNI152 space (NIfTI xform code 4), else ``scanner`` (or ``unknown``
        for a store made before the space was recorded)."""
        return self.manifest["fmri"].get("space", "unknown")

    def mean_image(self) -> Optional[Path]:
        """The subjects' mean functional image (mean over the training TRs, inside the mask), or None for a store
        made before it was kept."""
        name = self.manifest["fmri"].get("mean_image_file")
        return self.path / name if name and (self.path / name).is_file() else None

    def mask(self):
        """(mask bool (X, Y, Z), affine)."""
        from giblet.data.fmri import load_mask

        return load_mask(self.path / self.manifest["fmri"]["mask_file"])


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    """The manifest of the store at ``path``, refused clearly when missing, not JSON or of another schema."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(path, "no manifest.json", expected="a store made by `giblet data prepare`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(manifest_path, f"not valid JSON ({error})", expected="a manifest written by giblet") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            manifest_path,
            f"schema version {version}",
            expected=f"version {SCHEMA_VERSION}",
            fix="prepare the store again with this version of giblet",
        )
    return manifest


def open_store(path: Union[str, Path]) -> Store:
    path = Path(path)
    manifest = read_manifest(path)
    _check_array_files(path, manifest)
    return Store(path, manifest)


def _array_entries(manifest: Dict[str, Any]):
    """(file name, dtype, shape) of every array a manifest lists."""
    entries = [manifest.get("video"), manifest.get("text"), manifest.get("fmri")]
    entries += [manifest.get("audio", {}).get(name) for name in ("codes", "mel")]
    for entry in entries:
        if entry and "file" in entry:
            yield entry["file"], entry["dtype"], entry["shape"]
    fmri = manifest.get("fmri", {})
    if "mean_file" in fmri:
        yield fmri["mean_file"], fmri["dtype"], fmri["shape"][1:]


def _check_array_files(path: Path, manifest: Dict[str, Any]) -> None:
    """Every array file is there and as large as the manifest says: a truncated store fails here, naming the file,
    not later inside a memory map (`giblet data verify` checks their contents)."""
    from giblet.data.integrity import array_size_problem

    for name, dtype, shape in _array_entries(manifest):
        file = path / name
        problem = array_size_problem(file, dtype, shape)
        if problem:
            raise DataError(file, problem, expected="the store as `giblet data prepare` wrote it",
                            fix=f"prepare it again: giblet data prepare DATA --out {path} --force")


# --------------------------------------------------------------------------- preparing a store


def _entry(file: str, array_or_dtype, shape=None) -> Dict[str, Any]:
    if shape is None:
        return {"file": file, "dtype": str(array_or_dtype.dtype), "shape": list(array_or_dtype.shape)}
    return {"file": file, "dtype": str(np.dtype(array_or_dtype)), "shape": list(shape)}


def _counts(rate: float, start_s: float, n_samples: int, onsets: np.ndarray, window_s: float) -> Dict[str, int]:
    low, high = alignment_mod.window_counts(rate, onsets - start_s, window_s, n_samples)
    return {"min": low, "max": high}


def _per_window(rate, start_s, n_samples, onsets, tr_s, lookback_s) -> Dict[str, Dict[str, int]]:
    """Samples per TR and per model window, counted from exact times (never rounded per-TR counts)."""
    return {
        "per_tr": _counts(rate, start_s, n_samples, onsets, tr_s),
        "per_window": _counts(rate, start_s, n_samples, onsets - lookback_s, lookback_s + tr_s),
    }


def _write_video(movie: Path, info, config: Config, tmp: Path, progress: bool) -> Dict[str, Any]:
    from giblet.data import video

    width, height = config.video.width, config.video.height
    frame_bytes = height * width * 3
    decoded = tmp / "video_decoded.bin"
    times: List[np.ndarray] = []
    with open(decoded, "wb") as handle:
        for frames, chunk_times in video.iter_frames(movie, width, height, progress=progress):
            handle.write(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
            times.append(np.asarray(chunk_times, dtype=np.float64))
    frame_times = np.concatenate(times) if times else np.zeros(0)
    if frame_times.size == 0:
        raise DataError(movie, "no video frame could be decoded", expected="an H.264 (or other) video stream with frames")
    n_decoded = frame_times.size
    fps = float(info.fps)
    if video.is_regular(frame_times, fps):
        os.replace(decoded, tmp / "video_frames.bin")
        stored_times = frame_times
        regular = "as decoded"
    else:
        # Variable frame rate: store the frame on screen at each tick of a regular clock (no stretching).
        duration = float(frame_times[-1] + 1.0 / fps)
        index = video.regular_grid_index(frame_times, fps, duration)
        source = np.memmap(decoded, dtype=np.uint8, mode="r", shape=(n_decoded, height, width, 3))
        with open(tmp / "video_frames.bin", "wb") as handle:
            for start in range(0, index.size, 1024):
                handle.write(np.ascontiguousarray(source[index[start : start + 1024]]).tobytes())
        del source
        decoded.unlink()
        stored_times = np.arange(index.size, dtype=np.float64) / fps
        regular = f"resampled from {n_decoded} variable-rate frames to the nearest earlier frame at {info.fps_fraction} fps"
    np.save(tmp / "video_times.npy", stored_times)
    n_frames = stored_times.size
    assert (tmp / "video_frames.bin").stat().st_size == n_frames * frame_bytes
    return {
        **_entry("video_frames.bin", np.uint8, (n_frames, height, width, 3)),
        "times_file": "video_times.npy",
        "rate_hz": fps,
        "fps_fraction": info.fps_fraction,
        "start_s": 0.0,
        "regular": regular,
        "n_decoded_frames": int(n_decoded),
        "source_size": [info.width, info.height],
        "duration_s": float(n_frames / fps),
    }


def _write_audio(movie: Path, config: Config, tmp: Path, progress: bool) -> Dict[str, Any]:
    from giblet.data import audio

    features = config.audio.features
    if not features:
        return {"features": []}
    samples, rate, start_s = audio.read_audio(movie, progress=progress)
    result: Dict[str, Any] = {
        "features": list(features),
        "sample_rate": int(rate),
        "duration_s": float(samples.size / rate),
        "start_s": float(start_s),
    }
    if "mel" in features:
        mel, mel_rate = audio.mel_spectrogram(samples, rate, n_mels=config.audio.n_mels, frame_rate_hz=audio.MEL_RATE_HZ)
        mel16 = mel.astype(np.float16)
        np.save(tmp / "audio_mel.npy", mel16)
        result["mel"] = {**_entry("audio_mel.npy", mel16), "rate_hz": float(mel_rate), "start_s": float(start_s), "n_mels": int(mel.shape[1])}
    if "codes" in features:
        model = audio.load_encodec(config.audio.encodec_model, config.audio.bandwidth_kbps)
        codes = audio.encode_codes(samples, rate, model, progress=progress)
        n_q = audio.n_codebooks(config.audio.bandwidth_kbps, audio.architecture(model))
        codes = audio.check_codes(codes, n_q, f"EnCodec codes of {movie}")
        np.save(tmp / "audio_codes.npy", codes)
        result["codes"] = {
            **_entry("audio_codes.npy", codes),
            "rate_hz": float(model.frame_rate),
            "start_s": float(start_s),
            "n_codebooks": int(n_q),
            "codebook_size": int(model.quantizer.bins),
            "bandwidth_kbps": float(config.audio.bandwidth_kbps),
            "model": config.audio.encodec_model,
            "model_sample_rate": int(model.sample_rate),
        }
    return result


def _write_text(annotations: Path, config: Config, tmp: Path, progress: bool) -> Dict[str, Any]:
    from giblet.data import text

    t = config.text
    segments = text.read_annotations(annotations, t.start_column, t.end_column, tuple(t.text_columns), t.sheet)
    embedder = text.load_embedder(t.embedder)
    embeddings = text.embed_texts(segments.texts, embedder, progress=progress).astype(np.float16)
    np.save(tmp / "text_embeddings.npy", embeddings)
    np.save(tmp / "text_times.npy", np.stack([segments.starts, segments.ends], axis=1).astype(np.float64))
    (tmp / "text.json").write_text(json.dumps(list(segments.texts), ensure_ascii=False))
    return {
        **_entry("text_embeddings.npy", embeddings),
        "times_file": "text_times.npy",
        "texts_file": "text.json",
        "embedding_size": int(embeddings.shape[1] if embeddings.size else text.embedding_size(embedder)),
        "embedder": t.embedder,
        "n_segments": int(len(segments.texts)),
        "n_skipped_rows": int(segments.n_skipped),
    }


def _write_fmri(sources: Sources, infos, align, blocks, config: Config, tmp: Path, progress: bool) -> Dict[str, Any]:
    from giblet.data import fmri

    stop = align.first_tr + align.n_trs
    mask, valid_counts = fmri.shared_mask(sources.fmri, config.fmri.min_subject_fraction, n_trs=stop, progress=progress)
    n_voxels = int(mask.sum())
    if n_voxels == 0:
        raise DataError(
            sources.fmri[0].parent,
            "the shared mask is empty: no voxel is valid in enough subjects",
            expected=f"voxels valid in at least {config.fmri.min_subject_fraction:.0%} of subjects",
            fix="lower fmri.min_subject_fraction or drop the subject with the smallest valid count via data.subjects",
        )
    fmri.write_mask(mask, infos[0].affine, tmp / "mask.nii.gz")
    dtype = np.dtype(np.float16)  # z-scores: float16 keeps ~3 significant digits, far below the noise
    shape = (len(sources.fmri), align.n_trs, n_voxels)
    subject_trs = list(align.subject_trs)
    # Plain sequential writes, not a writable memmap: the written pages then belong to the
    # page cache, not to this process, and peak memory stays one subject's worth.
    total = np.zeros((align.n_trs, n_voxels), dtype=np.float32)
    mean_image = np.zeros(n_voxels, dtype=np.float64)  # the background of brain maps in the subjects' own space
    train = slice(*blocks["train"])
    with open(tmp / "fmri.bin", "wb") as handle, bar("fMRI: extract and z-score", total=len(sources.fmri), show=progress) as progress_bar:
        for path, has in zip(sources.fmri, subject_trs):
            series = fmri.extract(path, mask, n_trs=align.first_tr + has)[align.first_tr :]
            z, mean, _ = fmri.zscore(series, train)
            mean_image += mean / len(sources.fmri)
            del series
            # A subject cut short keeps the array's shape: its missing TRs hold 0 (its mean) and are marked
            # missing by fmri.subject_trs, so nothing downstream mistakes them for data.
            z = np.concatenate([z, np.zeros((align.n_trs - has, n_voxels), dtype=z.dtype)]) if has < align.n_trs else z
            z.astype(dtype).tofile(handle)
            total += z
            del z
            progress_bar.advance(1)
    # The group mean at each TR is over the subjects that have that TR.
    present_per_tr = (np.arange(align.n_trs)[:, None] < np.asarray(subject_trs)[None, :]).sum(axis=1)
    total /= np.maximum(present_per_tr, 1)[:, None]
    total.astype(dtype).tofile(tmp / "fmri_mean.bin")
    del total
    assert (tmp / "fmri.bin").stat().st_size == math.prod(shape) * dtype.itemsize
    from giblet.data.volume import save_volume

    save_volume(mean_image.astype(np.float32), (mask, infos[0].affine), tmp / "mean_image.nii.gz")
    return {
        **_entry("fmri.bin", dtype, shape),
        "mean_file": "fmri_mean.bin",
        "mask_file": "mask.nii.gz",
        "mean_image_file": "mean_image.nii.gz",
        "space": fmri.space_of(sources.fmri[0]),
        "subjects": list(sources.subjects),
        "subject_trs": subject_trs,
        "n_voxels": n_voxels,
        "grid_shape": list(mask.shape),
        "affine": np.asarray(infos[0].affine).tolist(),
        "mask_rule": fmri.VALIDITY_RULE,
        "min_subject_fraction": config.fmri.min_subject_fraction,
        "valid_voxels_per_subject": [int(v) for v in valid_counts],
        "zscore": "per subject and voxel, mean and standard deviation from the train TRs only",
    }


def check_consistent_headers(infos) -> None:
    """Every subject must share the first one's TR and voxel grid."""
    first = infos[0]
    for info in infos[1:]:
        if abs(info.tr_s - first.tr_s) > 1e-6:
            raise DataError(info.path, f"TR is {info.tr_s:g} s", expected=f"the TR of {first.path}, {first.tr_s:g} s")
        if tuple(info.shape[:3]) != tuple(first.shape[:3]):
            raise DataError(info.path, f"grid is {tuple(info.shape[:3])}", expected=f"the grid of {first.path}, {tuple(first.shape[:3])}")


def _check_fmri_headers(sources: Sources):
    from giblet.data import fmri

    infos = [fmri.probe_nifti(path) for path in sources.fmri]
    check_consistent_headers(infos)
    return infos


def align_sources(sources: Sources, movie, infos, config: Config) -> alignment_mod.Alignment:
    """The scan TRs the movie covers, on the clock of the longest subject; ``subject_trs`` counts the store TRs
    each subject has (a subject cut short has only the first ones; ``check_subject_lengths`` says which are
    enough). Subjects with more TRs than the movie covers are cut to it."""
    longest = max(range(len(infos)), key=lambda i: infos[i].n_trs)
    a = config.alignment
    align = alignment_mod.align(
        movie.duration_s,
        infos[longest].n_trs,
        infos[longest].tr_s,
        a.stimulus_onset_s,
        a.max_stimulus_beyond_s,
        a.max_fmri_beyond_s,
        stimulus_source=str(sources.movie),
        fmri_source=str(sources.fmri[longest]),
    )
    align.subject_trs = [max(0, min(info.n_trs - align.first_tr, align.n_trs)) for info in infos]
    for path, info, has in zip(sources.fmri, infos, align.subject_trs):
        if has < align.n_trs:
            align.notes.append(
                f"{path.name} has {info.n_trs} TRs, {align.n_trs - has} fewer than the movie covers: its store TRs "
                f"{has}-{align.n_trs - 1} are missing and are left out of the group mean, the noise ceiling and its scores"
            )
    return align


def check_subject_lengths(sources: Sources, align: alignment_mod.Alignment, blocks) -> None:
    """A subject cut short is used when it has every training TR (z-scoring and training see every subject);
    one that lacks some is refused, naming its file."""
    train_stop = blocks["train"][1]
    for path, has in zip(sources.fmri, align.subject_trs):
        if has < train_stop:
            raise DataError(
                path,
                f"covers {has} of the {align.n_trs} movie TRs",
                expected=f"at least the {train_stop} TRs of the training block (TRs 0-{train_stop - 1}); "
                         "a shorter subject can only miss validation or test TRs",
                fix="leave this subject out with data.subjects, or lower split.val_fraction / split.test_fraction",
            )


def split_trs(align: alignment_mod.Alignment, config: Config, source: str):
    """Train / val / test blocks of the aligned TRs, and the gap between them in TRs."""
    w = config.window
    return split_blocks(
        align.n_trs,
        align.tr_s,
        config.split.val_fraction,
        config.split.test_fraction,
        w.lookback_s + w.hrf_length_s,
        min_gap_s=w.lookback_s + w.hrf_length_s,
        source=source,
    )


def plan(data_dir: Union[str, Path], config: Config) -> Dict[str, Any]:
    """Everything about a folder that can be known from headers alone: sources, TR, alignment, splits."""
    from giblet.data import video

    sources = find_sources(data_dir, config)
    movie = video.probe_movie(sources.movie)
    infos = _check_fmri_headers(sources)
    align = align_sources(sources, movie, infos, config)
    blocks, gap_trs = split_trs(align, config, str(Path(data_dir)))
    check_subject_lengths(sources, align, blocks)
    return {"sources": sources, "movie": movie, "fmri_infos": infos, "alignment": align, "blocks": blocks, "gap_trs": gap_trs}


def remove_dead_temporaries(out: Path) -> List[Path]:
    """Remove the half-written stores (``.<out>.tmp-<host>-<pid>``) of processes of this host that are gone (e.g. a
    killed ``prepare``): each can be as large as the store. Another host's, or a live process's, stay."""
    removed = []
    host = socket.gethostname()
    prefix = f".{Path(out).name}.tmp-"
    for tmp in Path(out).parent.glob(f"{prefix}*"):
        name_host, _, pid = tmp.name[len(prefix):].rpartition("-")  # host names may hold dashes; the pid is last
        if name_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, left by process %s that ended before finishing the store", tmp, pid)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def prepare(
    data_dir: Union[str, Path],
    config: Config,
    out: Union[str, Path],
    progress: bool = True,
    force: bool = False,
) -> Store:
    """Prepare (or reuse) the store of ``data_dir`` under ``config`` at ``out``."""
    from giblet.data import integrity

    out = Path(out)
    remove_dead_temporaries(out)
    layout = plan(data_dir, config)
    sources = layout["sources"]
    known = None
    if (out / MANIFEST).is_file():
        try:
            existing = open_store(out)
            known = existing.manifest.get("sources")
        except DataError:
            existing = None
    else:
        existing = None
    digests = _source_digests(sources, known)
    key = store_key(digests, config)
    if existing is not None and existing.key == key and not force:
        log.info("reusing store %s (key %s)", out, key)
        return existing
    if existing is not None and not force:
        # A run trained on that store could no longer be resumed or evaluated: never replace it silently.
        changed = differences(existing.manifest.get("settings", {}), config.section(*STORE_SECTIONS))
        what = f"settings {', '.join(changed)}" if changed else "input files"
        raise DataError(out, f"holds the store of other {what} (key {existing.key}; these give {key})",
                        expected="a new store folder for new settings or data (stores sit side by side)",
                        fix="give --store another folder, or rebuild this one with `giblet data prepare --force` "
                            "(runs trained on it can then no longer be resumed or evaluated)")

    align = layout["alignment"]
    for note in align.notes:
        log.warning("%s", note)
    need = integrity.check_room(layout, config, out)  # before anything is written: a full disk is refused up front
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest: Dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "key": key,
            "giblet_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data_dir": str(Path(data_dir).resolve()),
            "sources": digests,
            "settings": config.section(*STORE_SECTIONS),
        }
        # The windows' TR clock, as window_index reads it (scans shifted earlier read P TRs later).
        onsets = alignment_mod.tr_onsets(align.n_trs, align.tr_s, align.stimulus_onset_s, align.first_tr)
        onsets = onsets + config.alignment.preshift_trs * align.tr_s
        lookback = config.window.lookback_s
        manifest["alignment"] = {
            "tr_s": align.tr_s,
            "stimulus_onset_s": align.stimulus_onset_s,
            "stimulus_duration_s": align.stimulus_duration_s,
            "fmri_trs": align.fmri_trs,
            "first_tr": align.first_tr,
            "n_trs": align.n_trs,
            "fmri_beyond_s": align.fmri_beyond_s,
            "stimulus_beyond_s": align.stimulus_beyond_s,
            "notes": align.notes,
        }
        manifest["splits"] = {"blocks": {k: list(v) for k, v in layout["blocks"].items()}, "gap_trs": layout["gap_trs"]}
        manifest["window"] = {"lookback_s": lookback, "window_s": lookback + align.tr_s, **config.section("window")["window"],
                              "text_timing": "grid"}

        # Cheapest first, so a bad annotation, scan or soundtrack fails before the long video decode.
        manifest["text"] = _write_text(sources.annotations, config, tmp, progress)
        manifest["fmri"] = _write_fmri(sources, layout["fmri_infos"], align, layout["blocks"], config, tmp, progress)

        audio_entry = _write_audio(sources.movie, config, tmp, progress)
        for name in ("codes", "mel"):
            if name in audio_entry:
                e = audio_entry[name]
                e.update(_per_window(e["rate_hz"], e["start_s"], e["shape"][1 if name == "codes" else 0], onsets, align.tr_s, lookback))
        manifest["audio"] = audio_entry

        video_entry = _write_video(sources.movie, layout["movie"], config, tmp, progress)
        video_entry.update(_per_window(video_entry["rate_hz"], 0.0, video_entry["shape"][0], onsets, align.tr_s, lookback))
        manifest["video"] = video_entry
        manifest["hashes"] = integrity.record_hashes(tmp, manifest, progress)  # for `giblet data verify`
        manifest["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _install(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if integrity.is_disk_full(error):  # the estimate was short, or something else took the room meanwhile
            raise integrity.disk_full_error(out, need, error) from error
        raise
    return open_store(out)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished store into place; an older store at ``out`` is replaced only after the new one is complete."""
    if out.exists():
        if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise DataError(out, "exists and is not a giblet store", expected="a new folder, or a store to replace")
    replace_folder(tmp, out)


RUN_STORE = "store.json"  # in a run folder: where its store is, when it is not RUN/store


def record_run_store(run: Path, store: "Store") -> None:
    """Remember in ``RUN/store.json`` the store a run trains on (path and key), so evaluate and lesion find it."""
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{RUN_STORE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"path": str(Path(store.path).resolve()), "key": store.key}, indent=2))
    os.replace(tmp, run / RUN_STORE)


def run_store_path(run: Path) -> Path:
    """The store of a run folder: ``RUN/store`` if it holds one, else the one ``RUN/store.json`` names."""
    run = Path(run)
    if (run / "store" / MANIFEST).is_file() or not (run / RUN_STORE).is_file():
        return run / "store"
    recorded = Path(json.loads((run / RUN_STORE).read_text())["path"])
    if not (recorded / MANIFEST).is_file():
        raise DataError(run / RUN_STORE, f"names the run's store {recorded}, which holds no store now",
                        expected="the store the run was trained on", fix="pass --store with its new place")
    return recorded


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an older ``out`` is moved aside first and removed after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def directory_size(path: Union[str, Path]) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
