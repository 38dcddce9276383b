"""Dataset download against a local HTTP server: resume, checksum, atomic unzip, unsafe archives."""

import hashlib
import http.server
import io
import os
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from giblet.data import download as download_module
from giblet.data.download import DEFAULT_URL_ENV, download
from giblet.errors import DataError

SHERLOCK_FILES = {
    "sherlock/stimuli_Sherlock.m4v": os.urandom(300_000),
    "sherlock/annotations.xlsx": b"PK fake spreadsheet " * 50,
    "sherlock/sherlock_nii/sherlock_movie_s1.nii.gz": os.urandom(200_000),
}


def make_zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


SHERLOCK_ZIP = make_zip(SHERLOCK_FILES)
SHERLOCK_SHA256 = hashlib.sha256(SHERLOCK_ZIP).hexdigest()


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload``; honours ``Range: bytes=N-`` unless told not to, and can drop the first transfer."""

    def do_GET(self):
        server = self.server
        range_header = self.headers.get("Range")
        server.range_headers.append(range_header)
        first_request = len(server.range_headers) == 1
        payload = server.payload
        if server.error_status is not None:
            self.send_error(server.error_status)
            return

        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

        if first_request and server.drop_after is not None:
            self.wfile.write(body[: server.drop_after])
            self.wfile.flush()
            # Simulates a network failure: the client sees the stream end before Content-Length bytes.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    httpd.daemon_threads = True
    httpd.payload = SHERLOCK_ZIP
    httpd.honour_range = True
    httpd.drop_after = None
    httpd.error_status = None
    httpd.range_headers = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/Sherlock.zip"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_retry_pause(monkeypatch):
    monkeypatch.setattr(download_module, "RETRY_PAUSE_S", 0.0)


@pytest.fixture
def workdir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return work


def assert_sherlock_layout(data_dir: Path):
    for name, data in SHERLOCK_FILES.items():
        assert (data_dir / name.removeprefix("sherlock/")).read_bytes() == data


def leftovers(workdir: Path):
    return sorted(p.name for p in workdir.iterdir())


def test_full_download_verifies_and_unzips(server, workdir):
    data_dir = workdir / "sherlock"
    result = download(data_dir, server.url, sha256=SHERLOCK_SHA256.upper(), progress=True)
    assert result == data_dir
    assert_sherlock_layout(data_dir)
    assert leftovers(workdir) == ["sherlock"]
    assert server.range_headers == [None]


def test_interrupted_transfer_resumes_with_range(server, workdir):
    server.drop_after = 123_456
    data_dir = workdir / "sherlock"
    download(data_dir, server.url, sha256=SHERLOCK_SHA256, progress=False, chunk_bytes=4096, retries=2)
    assert server.range_headers == [None, "bytes=123456-"]
    assert_sherlock_layout(data_dir)
    assert leftovers(workdir) == ["sherlock"]


def test_later_call_resumes_partial_download(server, workdir):
    server.drop_after = 50_000
    data_dir = workdir / "sherlock"
    with pytest.raises(DataError, match="failed after 1 attempts"):
        download(data_dir, server.url, sha256=SHERLOCK_SHA256, progress=False, retries=0)
    part = workdir / ".sherlock.download" / "Sherlock.zip.part"
    assert part.stat().st_size == 50_000
    assert not data_dir.exists()

    download(data_dir, server.url, sha256=SHERLOCK_SHA256, progress=False, retries=0)
    assert server.range_headers == [None, "bytes=50000-"]
    assert_sherlock_layout(data_dir)
    assert leftovers(workdir) == ["sherlock"]


def test_complete_part_file_is_not_downloaded_again(server, workdir):
    part = workdir / ".sherlock.download" / "Sherlock.zip.part"
    part.parent.mkdir()
    part.write_bytes(SHERLOCK_ZIP)
    download(workdir / "sherlock", server.url, sha256=SHERLOCK_SHA256, progress=False)
    assert server.range_headers == [f"bytes={len(SHERLOCK_ZIP)}-"]
    assert_sherlock_layout(workdir / "sherlock")


def test_wrong_checksum_names_both_digests_and_leaves_nothing(server, workdir):
    wrong = "0" * 64
    with pytest.raises(DataError) as error:
        download(workdir / "sherlock", server.url, sha256=wrong, progress=False)
    message = str(error.value)
    assert server.url in message and wrong in message and SHERLOCK_SHA256 in message
    assert leftovers(workdir) == []


def test_server_ignoring_range_restarts_from_zero(server, workdir):
    server.drop_after = 70_000
    server.honour_range = False
    data_dir = workdir / "sherlock"
    download(data_dir, server.url, sha256=SHERLOCK_SHA256, progress=False, retries=1)
    assert server.range_headers == [None, "bytes=70000-"]
    assert_sherlock_layout(data_dir)
    assert leftovers(workdir) == ["sherlock"]


def test_existing_nonempty_folder_is_refused_before_downloading(server, workdir):
    data_dir = workdir / "sherlock"
    data_dir.mkdir()
    (data_dir / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists; expected a new or empty folder"):
        download(data_dir, server.url, progress=False)
    assert server.range_headers == []
    assert leftovers(workdir) == ["sherlock"]
    assert (data_dir / "mine.txt").read_text() == "keep me"


def test_existing_empty_folder_is_filled(server, workdir):
    data_dir = workdir / "sherlock"
    data_dir.mkdir()
    download(data_dir, server.url, sha256=SHERLOCK_SHA256, progress=False)
    assert_sherlock_layout(data_dir)


@pytest.mark.parametrize("evil_name", ["sherlock/../../evil.txt", "/tmp/evil.txt"])
def test_zip_slip_member_is_refused(server, workdir, evil_name):
    server.payload = make_zip({"sherlock/ok.txt": b"ok", evil_name: b"evil"})
    data_dir = workdir / "sherlock"
    with pytest.raises(DataError, match="outside the data folder"):
        download(data_dir, server.url, progress=False)
    assert leftovers(workdir) == []
    assert not (workdir.parent / "evil.txt").exists()


def test_bad_zip_is_refused_and_leaves_nothing(server, workdir):
    server.payload = b"this is not a zip archive" * 100
    with pytest.raises(DataError, match="not a readable zip"):
        download(workdir / "sherlock", server.url, progress=False)
    assert leftovers(workdir) == []


def test_archive_without_single_top_folder_is_used_as_is(server, workdir):
    server.payload = make_zip({"a.txt": b"a", "sub/b.txt": b"b"})
    data_dir = workdir / "sherlock"
    download(data_dir, server.url, progress=False)
    assert (data_dir / "a.txt").read_bytes() == b"a"
    assert (data_dir / "sub" / "b.txt").read_bytes() == b"b"


def test_missing_checksum_prints_digest_to_pin(server, workdir, capsys):
    download(workdir / "sherlock", server.url, progress=False)
    assert SHERLOCK_SHA256 in capsys.readouterr().err


def test_missing_file_on_server_is_reported_without_retrying(server, workdir):
    server.error_status = 404
    with pytest.raises(DataError, match="HTTP 404"):
        download(workdir / "sherlock", server.url, progress=False, retries=3)
    assert server.range_headers == [None]
    assert leftovers(workdir) == []


def test_file_url_and_environment_default(tmp_path, workdir, monkeypatch):
    archive = tmp_path / "Sherlock.zip"
    archive.write_bytes(SHERLOCK_ZIP)
    monkeypatch.setenv(DEFAULT_URL_ENV, archive.as_uri())
    data_dir = download(workdir / "sherlock", None, sha256=SHERLOCK_SHA256, progress=False)
    assert_sherlock_layout(data_dir)
    assert leftovers(workdir) == ["sherlock"]


def test_no_url_and_no_environment_variable_asks_for_url(workdir, monkeypatch):
    monkeypatch.delenv(DEFAULT_URL_ENV, raising=False)
    with pytest.raises(DataError, match="--url"):
        download(workdir / "sherlock", None, progress=False)
    assert leftovers(workdir) == []
