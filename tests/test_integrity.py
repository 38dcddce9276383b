"""A store's integrity: prepare records every file's sha256 and `giblet data verify` checks it; a disk too small
is refused before anything is written, and one that fills while writing leaves nothing behind."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from giblet.data import integrity, verify
from giblet.data import store as store_mod
from giblet.data.store import open_store, prepare
from giblet.errors import DataError
from giblet_cli.main import app

runner = CliRunner()


def _copy_store(tiny_store, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(tiny_store.path, copy)
    return copy


def _verify(path: Path):
    return runner.invoke(app, ["data", "verify", str(path)])


# --------------------------------------------------------------------------- hashes and verify


def test_prepare_records_the_hash_of_every_file_the_manifest_lists(tiny_store):
    hashes = tiny_store.manifest["hashes"]
    listed = integrity.store_files(tiny_store.manifest)
    assert {"video_frames.bin", "video_times.npy", "audio_codes.npy", "audio_mel.npy", "text_embeddings.npy",
            "text_times.npy", "text.json", "fmri.bin", "fmri_mean.bin", "mask.nii.gz", "mean_image.nii.gz"} == set(listed) == set(hashes)
    for name, record in hashes.items():
        assert record["bytes"] == (tiny_store.path / name).stat().st_size
        assert record["sha256"] == integrity.sha256_file(tiny_store.path / name, chunk=1000)  # any chunk, one hash


def test_verify_passes_on_a_fresh_store(tiny_store):
    result = _verify(tiny_store.path)
    assert result.exit_code == 0, result.output
    assert result.output.count(" ok ") == len(tiny_store.manifest["hashes"])
    assert "MISMATCH" not in result.output and f"all {len(tiny_store.manifest['hashes'])} files match" in result.output


def test_a_flipped_byte_is_a_mismatch_naming_the_file_both_hashes_and_the_fix(tiny_store, tmp_path):
    copy = _copy_store(tiny_store, tmp_path)
    file = copy / "fmri.bin"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the content hash can tell
    file.write_bytes(bytes(data))
    open_store(copy)  # the size check passes
    result = _verify(copy)
    assert result.exit_code != 0
    recorded = tiny_store.manifest["hashes"]["fmri.bin"]["sha256"]
    found = integrity.sha256_file(file)
    output = " ".join(result.output.split())
    rows = [line.split()[:2] for line in result.output.splitlines() if line.strip().startswith(("ok ", "MISMATCH ", "missing "))]
    assert [name for status, name in rows if status != "ok"] == ["fmri.bin"] and len(rows) == len(tiny_store.manifest["hashes"])
    assert "MISMATCH fmri.bin" in output, result.output
    assert f"{file}: MISMATCH: sha256 {found[:12]}" in output and recorded[:12] in output
    assert f"giblet data prepare {tiny_store.manifest['data_dir']} --out {copy} --force" in output


def test_a_missing_file_is_named_missing(tiny_store, tmp_path):
    copy = _copy_store(tiny_store, tmp_path)
    (copy / "text.json").unlink()
    checks, error = verify.verify(copy, progress=False)
    assert [c.name for c in checks if c.status != verify.OK] == ["text.json"]
    assert str(error).startswith(f"{copy / 'text.json'}: missing") and "--force" in str(error)


def test_a_store_without_recorded_hashes_opens_and_is_told_how_to_get_them(tiny_store, tmp_path):
    copy = _copy_store(tiny_store, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["hashes"]  # as prepared before hashes were recorded: the same schema version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert open_store(copy).key == tiny_store.key
    result = _verify(copy)
    assert result.exit_code != 0
    output = " ".join(result.output.split())
    assert "records no content hashes" in output and "the sizes of its files match the manifest" in output, output
    assert f"--out {copy} --force" in output
    # The sizes are still checked.
    (copy / "fmri_mean.bin").write_bytes(b"\0" * 10)
    checks, error = verify.verify(copy, progress=False)
    assert [c.name for c in checks if c.status != verify.OK] == ["fmri_mean.bin"]
    assert "1 of its" in str(error) and "fmri_mean.bin" in str(error) and "records no content hashes" in str(error)


# --------------------------------------------------------------------------- room on the disk


def test_the_estimate_covers_the_store_without_overstating_it(tiny_data, tiny_config, tiny_store):
    parts = integrity.estimate_store_bytes(store_mod.plan(tiny_data, tiny_config), tiny_config)
    for name in ("video_frames.bin", "fmri.bin", "fmri_mean.bin", "audio_codes.npy", "audio_mel.npy"):
        actual = (tiny_store.path / name).stat().st_size
        assert actual <= parts[name] <= actual * 1.01 + 4096, name
    actual = store_mod.directory_size(tiny_store.path)
    assert actual <= sum(parts.values()) <= actual * 1.1 + (1 << 20)


def _little_room(free: int):
    def disk_usage(path):
        return shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - free, free)

    return disk_usage


def test_a_disk_without_room_is_refused_before_anything_is_written(tiny_data, tiny_config, tiny_store, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _little_room(2**20))
    out = tmp_path / "stores" / "store"
    with pytest.raises(DataError) as error:
        prepare(tiny_data, tiny_config, out, progress=False)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: 1.0 MiB free on its disk; the store {out} needs about "), message
    need = float(message.split("needs about ")[1].split(" MiB")[0])
    assert need >= store_mod.directory_size(tiny_store.path) / 2**20  # the room needed, named
    assert f"expected at least {need:.1f} MiB free there before prepare writes anything" in message
    assert "--out of `giblet data prepare`" in message
    assert list(tmp_path.iterdir()) == []  # not even the parent folder


def _disk_fills(message):
    def write_fmri(sources, infos, align, blocks, config, tmp, progress):
        (tmp / "fmri.bin").write_bytes(b"\0" * 4096)  # part written, then the disk is full
        raise OSError(errno.ENOSPC, message) if message.startswith("No space") else OSError(message)

    return write_fmri


@pytest.mark.parametrize("message", ["No space left on device", "6000000 requested and 4096 written"])  # numpy's tofile
def test_a_disk_that_fills_while_writing_gives_a_clear_error_and_leaves_nothing(tiny_data, tiny_config, tmp_path, monkeypatch,
                                                                                message):
    monkeypatch.setattr(store_mod, "_write_fmri", _disk_fills(message))
    out = tmp_path / "stores" / "store"
    with pytest.raises(DataError) as error:
        prepare(tiny_data, tiny_config, out, progress=False)
    text = str(error.value)
    assert text.startswith(f"{out.parent}: the disk ran out of room while prepare wrote the store {out} ("), text
    assert f"{message})" in text and "MiB free for the store" in text
    assert "free now, nothing half-written was left" in text and "--store of `giblet train`" in text
    assert isinstance(error.value.__cause__, OSError)
    assert list(out.parent.iterdir()) == []  # the temporary folder is gone


def test_other_write_errors_stay_what_they_are(tiny_data, tiny_config, tmp_path, monkeypatch):
    def write_fmri(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_mod, "_write_fmri", write_fmri)
    with pytest.raises(PermissionError):
        prepare(tiny_data, tiny_config, tmp_path / "store", progress=False)
    assert list(tmp_path.iterdir()) == []
