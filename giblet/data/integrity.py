"""A store's integrity on disk: the room it needs, checked before ``prepare`` writes anything, and the sha256 of
every file it holds, recorded in the manifest at prepare time and checked again by ``giblet data verify``
(``giblet.data.verify``). Nothing here reads a store: ``giblet.data.store`` builds on it.

``manifest["hashes"]`` maps each file the manifest lists to ``{"sha256": HEX, "bytes": N}``. It is optional:
a store prepared before it existed still opens (the schema version is the same); ``verify`` then checks the
sizes only and says how to get the hashes (``giblet data prepare ... --force``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from giblet.errors import DataError
from giblet.progress import bar

HASH_CHUNK = 1 << 22  # 4 MiB reads: sha256 runs at disk / page-cache speed
BAR_MIN_BYTES = 64 << 20  # a progress bar for hashing this much or more
NPY_HEADER = 128  # np.save's header for the arrays a store holds (a multiple of 64 bytes)
EMBEDDING_WIDTH_BOUND = 1024  # the widest text embedder the docs name (bge-large); the default is 384-d


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path, advance=None, chunk: int = HASH_CHUNK) -> str:
    """The sha256 of a file, read in chunks into one reused buffer; ``advance(n)`` is called per chunk read."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            if advance is not None:
                advance(n)
    return digest.hexdigest()


def store_files(manifest: Dict[str, Any]) -> List[str]:
    """Every file a manifest lists (arrays, their times, the texts, the fMRI mean and the mask), each once."""
    entries = [manifest.get("video"), manifest.get("text"), manifest.get("fmri")]
    entries += [manifest.get("audio", {}).get(name) for name in ("codes", "mel")]
    names: List[str] = []
    for entry in entries:
        for key in ("file", "times_file", "texts_file", "mean_file", "mask_file", "mean_image_file"):
            name = (entry or {}).get(key)
            if name and name not in names:
                names.append(name)
    return names


def hash_bar(total: int, description: str, progress: Optional[bool]):
    return bar(f"{description} ({total / 2**20:,.0f} MiB)", total=total / 2**20,
               show=False if progress is False or total < BAR_MIN_BYTES else None)


def record_hashes(folder: Path, manifest: Dict[str, Any], progress: Optional[bool] = None) -> Dict[str, Dict[str, Any]]:
    """``{file: {"sha256", "bytes"}}`` of every file the manifest lists, for ``manifest["hashes"]``."""
    names = store_files(manifest)
    sizes = {name: (folder / name).stat().st_size for name in names}
    hashes = {}
    with hash_bar(sum(sizes.values()), "hash the store's files", progress) as progress_bar:
        for name in names:
            hashes[name] = {"sha256": sha256_file(folder / name, lambda n: progress_bar.advance(n / 2**20)), "bytes": sizes[name]}
    return hashes


# --------------------------------------------------------------------------- sizes


def array_size_problem(file: Path, dtype: str, shape) -> Optional[str]:
    """Why ``file`` cannot hold the ``dtype`` ``shape`` array the manifest lists (missing or another size), or None."""
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = file.stat().st_size if file.is_file() else None
    # A .npy file adds its header (a multiple of 64 bytes) in front of the data.
    if size is not None and (size == expected if file.suffix != ".npy" else 0 < size - expected <= 65536):
        return None
    found = "missing" if size is None else f"{size:,} bytes"
    return f"{found}; the manifest lists {dtype} {tuple(shape)} ({expected:,} bytes of data)"


# --------------------------------------------------------------------------- room on the disk


def _size(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _estimate_voxels(paths: List[Path], infos, min_fraction: float, n_volumes: int = 3) -> int:
    """The shared mask's size, from each subject's first volumes: a voxel counts where it is finite and not
    constant over them in enough subjects (the mask asks that over every TR). A subject that cannot be read
    here counts as all valid; prepare names the file when it reads it."""
    import nibabel as nib

    from giblet.data.fmri import subjects_required

    grid = tuple(infos[0].shape[:3])
    counts = np.zeros(grid, dtype=np.int32)
    for path, info in zip(paths, infos):
        try:
            volumes = np.asarray(nib.load(str(path)).dataobj[..., : min(n_volumes, info.n_trs)], dtype=np.float32)
            with np.errstate(invalid="ignore"):
                valid = np.isfinite(volumes).all(axis=-1) & (volumes.max(axis=-1) != volumes.min(axis=-1))
        except Exception:  # nibabel and gzip raise many types; the reader in prepare reports them properly
            valid = np.ones(grid, dtype=bool)
        counts += valid
    return int((counts >= subjects_required(min_fraction, len(paths))).sum())


def estimate_store_bytes(layout: Dict[str, Any], config) -> Dict[str, int]:
    """The bytes of each file (group) the store of ``layout`` (``store.plan``) will hold, from headers, the
    annotations and the first fMRI volumes; nothing is decoded."""
    from giblet.data import audio, text

    movie, align, sources = layout["movie"], layout["alignment"], layout["sources"]
    parts: Dict[str, int] = {}
    n_frames = max(int(movie.n_frames_estimate), math.ceil(movie.duration_s * movie.fps)) + 1
    parts["video_frames.bin"] = n_frames * config.video.height * config.video.width * 3
    parts["video_times.npy"] = n_frames * 8 + NPY_HEADER
    features = config.audio.features
    audio_s = movie.audio_duration_s or movie.duration_s
    if features and movie.has_audio and movie.audio_rate:
        if "mel" in features:
            rate = movie.audio_rate / audio.mel_hop(movie.audio_rate, audio.MEL_RATE_HZ)
            parts["audio_mel.npy"] = (int(audio_s * rate) + 1) * config.audio.n_mels * 2 + NPY_HEADER
        if "codes" in features:
            try:
                n_q = audio.n_codebooks(config.audio.bandwidth_kbps, audio.named_architecture(config.audio.encodec_model))
            except ValueError:  # prepare refuses the setting itself, naming it
                n_q = 0
            rate = audio.code_rate_hz(config.audio.encodec_model)
            parts["audio_codes.npy"] = n_q * (math.ceil(audio_s * rate) + 1) * 2 + NPY_HEADER
    t = config.text
    segments = text.read_annotations(sources.annotations, t.start_column, t.end_column, tuple(t.text_columns), t.sheet)
    parts["text (embeddings, times, texts)"] = (len(segments.texts) * (EMBEDDING_WIDTH_BOUND * 2 + 16) + 2 * NPY_HEADER
                                               + len(json.dumps(list(segments.texts), ensure_ascii=False).encode()))
    n_voxels = _estimate_voxels(sources.fmri, layout["fmri_infos"], config.fmri.min_subject_fraction)
    parts["fmri.bin"] = len(sources.fmri) * align.n_trs * n_voxels * 2
    parts["fmri_mean.bin"] = align.n_trs * n_voxels * 2
    parts["mask.nii.gz"] = int(np.prod(layout["fmri_infos"][0].shape[:3])) + 352  # bound: uint8 grid + header, before gzip
    parts["manifest.json"] = 64 << 10
    return parts


def _existing_folder(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(layout: Dict[str, Any], config, out: Path) -> int:
    """Refuse, before anything is written, a store that does not fit on the disk of its folder (where the
    temporary folder is written beside it); returns the bytes it needs."""
    parts = estimate_store_bytes(layout, config)
    need = sum(parts.values())
    folder = _existing_folder(Path(out).parent)
    free = shutil.disk_usage(folder).free
    if need > free:
        largest = ", ".join(f"{name} {_size(n)}" for name, n in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
        raise DataError(folder, f"{_size(free)} free on its disk; the store {out} needs about {_size(need)} "
                        f"({largest}, ...)", expected=f"at least {_size(need)} free there before prepare writes anything",
                        fix="free that much disk space, or prepare the store on another disk "
                            "(--out of `giblet data prepare`, --store of `giblet train`)")
    return need


def is_disk_full(error: BaseException) -> bool:
    """An error that says the disk (or quota) is full, itself or anywhere in what caused it."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
            # numpy's tofile reports a short write with no errno: "1000000 requested and 0 written"
            if error.errno is None and re.search(r"\d+ requested and \d+ written", str(error)):
                return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def disk_full_error(out: Path, need: int, error: BaseException) -> DataError:
    """What to say when the disk fills while prepare writes (the estimate was short, or something else took the
    room); call it after the temporary folder is removed, so the free space counts what is really free."""
    folder = _existing_folder(Path(out).parent)
    free = shutil.disk_usage(folder).free
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(folder, f"the disk ran out of room while prepare wrote the store {out} ({reason}); "
                     f"{_size(free)} free now, nothing half-written was left",
                     expected=f"about {_size(need)} free for the store",
                     fix="free disk space there, or prepare the store on another disk "
                         "(--out of `giblet data prepare`, --store of `giblet train`)")
