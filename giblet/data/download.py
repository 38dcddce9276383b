"""Fetch the dataset archive: resumable download, sha256 check, atomic unzip into a new folder.

The download lives in ``<parent>/.<name>.download/<file>.part`` until the archive is unpacked,
so an interrupted transfer (or a later call) picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Union

from giblet.errors import DataError
from giblet.progress import bar

DEFAULT_URL_ENV = "GIBLET_DATA_URL"

# Seconds to wait before retry number n is n * RETRY_PAUSE_S; a dropped connection often needs a moment.
RETRY_PAUSE_S = 1.0

_SCHEMES = ("http", "https", "file")
# Status codes worth another try: the server is busy or broken for now, not refusing for good.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# macOS zip tools add this folder beside the real content; it is not part of the dataset.
_ZIP_JUNK = "__MACOSX"


class _TransferInterrupted(Exception):
    """The connection ended early; what arrived is on disk and the next attempt resumes from it."""


def download(
    data_dir: Union[str, Path],
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
    timeout_s: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download the zip at ``url``, verify it, and unpack it into the new folder ``data_dir``.

    ``url`` defaults to the ``GIBLET_DATA_URL`` environment variable. Returns ``data_dir``.
    """
    data_dir = Path(data_dir)
    url = _resolve_url(url)
    _require_new_folder(data_dir)

    download_dir = data_dir.parent / f".{data_dir.name}.download"
    download_dir.mkdir(parents=True, exist_ok=True)
    part = download_dir / (_archive_name(url) + ".part")

    try:
        _fetch_with_retries(url, part, progress, chunk_bytes, timeout_s, retries)
    except DataError:
        # Keep a partial download for the next run to resume; leave no empty folder behind.
        if not part.exists() or part.stat().st_size == 0:
            shutil.rmtree(download_dir, ignore_errors=True)
        raise

    digest = _sha256_of(part, chunk_bytes)
    if sha256 is None:
        print(f"{url}: sha256 {digest} (pass --sha256 {digest} to verify it next time)", file=sys.stderr)
    elif digest != sha256.strip().lower():
        # A complete file with the wrong content cannot be repaired by resuming it.
        shutil.rmtree(download_dir, ignore_errors=True)
        raise DataError(
            url,
            f"downloaded file has sha256 {digest}",
            expected=f"sha256 {sha256.strip().lower()}",
            fix="check the URL and the sha256 value; the download was deleted, so the next run starts over",
        )

    try:
        _unzip_into_new_folder(part, data_dir, url)
    except DataError:
        # The archive itself is bad, so keeping it for a resume would only repeat this error.
        shutil.rmtree(download_dir, ignore_errors=True)
        raise
    shutil.rmtree(download_dir, ignore_errors=True)
    return data_dir


def _resolve_url(url: Optional[str]) -> str:
    if url is None:
        url = os.environ.get(DEFAULT_URL_ENV) or None
    if url is None:
        raise DataError(
            None,
            "no download URL given; the Sherlock dataset is not redistributed by giblet and must be fetched "
            "from its distributor",
            fix=f"pass --url with the address of the dataset zip (or set {DEFAULT_URL_ENV})",
        )
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise DataError(url, f"unsupported URL scheme {scheme!r}", expected="an http://, https:// or file:// URL")
    return url


def _require_new_folder(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    if not data_dir.is_dir() or any(data_dir.iterdir()):
        raise DataError(
            data_dir,
            "already exists",
            expected="a new or empty folder",
            fix="remove it or choose another data folder",
        )


def _archive_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name or "download.zip"


def _fetch_with_retries(
    url: str, part: Path, progress: bool, chunk_bytes: int, timeout_s: float, retries: int
) -> None:
    failures = 0
    while True:
        try:
            _fetch_once(url, part, progress, chunk_bytes, timeout_s)
            return
        except urllib.error.HTTPError as exc:
            if exc.code not in _RETRYABLE_STATUS:
                raise DataError(url, f"server answered HTTP {exc.code} {exc.reason}",
                                fix="check the URL; it must point at the dataset zip") from exc
            problem = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (FileNotFoundError, PermissionError, IsADirectoryError)):
                raise DataError(url, f"cannot open: {exc.reason}", fix="check the URL") from exc
            problem = str(exc.reason)
        except (_TransferInterrupted, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
        except OSError as exc:
            # Disk full, no permission and the like: another attempt would fail the same way.
            raise DataError(part, f"cannot write the download: {exc}",
                            fix="free disk space or fix permissions, then run again to resume") from exc
        failures += 1
        if failures > retries:
            raise DataError(
                url,
                f"download failed after {failures} attempts: {problem}",
                fix=f"check the network and run again; it resumes from {part}",
            )
        time.sleep(RETRY_PAUSE_S * failures)


def _fetch_once(url: str, part: Path, progress: bool, chunk_bytes: int, timeout_s: float) -> None:
    """One request: resume ``part`` if the server honours ranges, else rewrite it from the start."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "giblet"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Nothing left to send: either the file is already complete, or it changed on the server.
        total = _total_from_content_range(exc.headers.get("Content-Range"))
        exc.close()
        if total == offset:
            return
        part.unlink()
        raise _TransferInterrupted("the server file no longer matches the partial download; starting over")

    with response:
        status = response.getcode() or 200  # file:// responses carry no status
        length = _int_or_none(response.headers.get("Content-Length"))
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _TransferInterrupted(f"server resumed at byte {start}, not {offset}; starting over")
            if total is None and length is not None:
                total = start + length
            mode = "ab"
        else:
            offset, total, mode = 0, length, "wb"

        received = offset
        with open(part, mode) as out, bar("download", total=total, show=progress) as progress_bar:
            progress_bar.advance(offset)
            while True:
                chunk = response.read(chunk_bytes)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                progress_bar.advance(len(chunk))
    # http.client returns a short body silently when the peer closes early, so count the bytes.
    if total is not None and received < total:
        raise _TransferInterrupted(f"connection closed after {received} of {total} bytes")


def _parse_content_range(header: Optional[str]) -> "tuple[Optional[int], Optional[int]]":
    """``bytes START-END/TOTAL`` -> (START, TOTAL); TOTAL is None when the server sends ``*``."""
    try:
        _unit, spec = header.split(None, 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
    except (AttributeError, ValueError):
        return None, None
    return start, _int_or_none(total)


def _total_from_content_range(header: Optional[str]) -> Optional[int]:
    if not header or "/" not in header:
        return None
    return _int_or_none(header.rsplit("/", 1)[1])


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(text.strip())
    except (AttributeError, ValueError):
        return None


def _sha256_of(path: Path, chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unsafe_member(name: str) -> bool:
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def _unzip_into_new_folder(archive: Path, data_dir: Path, url: str) -> None:
    """Extract beside ``data_dir`` (same filesystem) and rename into place, so ``data_dir`` appears whole or not at all."""
    extract_dir = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.extract-", dir=data_dir.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                unsafe = [name for name in zf.namelist() if _unsafe_member(name)]
                if unsafe:
                    raise DataError(
                        url,
                        f"archive member {unsafe[0]!r} would be written outside the data folder",
                        expected="only relative paths without '..'",
                        fix="get the archive from its original distributor",
                    )
                zf.extractall(extract_dir)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise DataError(url, f"not a readable zip archive: {exc}", expected="the dataset .zip",
                            fix="check the URL; the download was deleted, so the next run starts over") from exc

        shutil.rmtree(extract_dir / _ZIP_JUNK, ignore_errors=True)
        entries = list(extract_dir.iterdir())
        # Archives usually wrap everything in one folder; its contents are the dataset.
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else extract_dir

        try:
            if data_dir.exists():
                data_dir.rmdir()  # checked empty earlier; fails if something appeared since
            os.replace(source, data_dir)
        except OSError as exc:
            raise DataError(data_dir, f"cannot move the unpacked data into place: {exc}",
                            expected="a new or empty folder", fix="remove it or choose another data folder") from exc
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
