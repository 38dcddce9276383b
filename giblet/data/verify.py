"""``giblet data verify``: a store's files against the sizes and sha256 its manifest records
(``giblet.data.integrity`` records them when ``prepare`` writes the store)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from giblet.data.integrity import array_size_problem, hash_bar, sha256_file, store_files
from giblet.data.store import MANIFEST, _array_entries, read_manifest
from giblet.errors import DataError

PREFIX = 12  # hex digits of a hash shown in messages
OK, MISMATCH, MISSING = "ok", "MISMATCH", "missing"


@dataclass
class FileCheck:
    name: str
    status: str  # OK, MISMATCH or MISSING
    detail: str


def rebuild_command(path: Path, manifest: Dict[str, Any]) -> str:
    return f"giblet data prepare {shlex.quote(str(manifest.get('data_dir', 'DATA')))} --out {shlex.quote(str(path))} --force"


def verify(path: Union[str, Path], progress: Optional[bool] = None) -> Tuple[List[FileCheck], Optional[DataError]]:
    """Hash every file of the store at ``path`` again and compare with the manifest: one check per file, and the
    error to report (None when every file matches). A store without recorded hashes has its sizes checked and
    gets an error saying so."""
    path = Path(path)
    manifest = read_manifest(path)
    fix = f"rebuild the store: {rebuild_command(path, manifest)}"
    recorded = manifest.get("hashes")
    checks: List[FileCheck] = []
    if not recorded:
        arrays = {name: (dtype, shape) for name, dtype, shape in _array_entries(manifest)}
        for name in store_files(manifest):
            file = path / name
            if not file.is_file():
                checks.append(FileCheck(name, MISSING, "not found"))
            elif name in arrays and (problem := array_size_problem(file, *arrays[name])):
                checks.append(FileCheck(name, MISMATCH, problem))
            else:
                checks.append(FileCheck(name, OK, f"{file.stat().st_size:,} bytes (size only: no hash recorded)"))
        bad = [c for c in checks if c.status != OK]
        sizes = "the sizes of its files match the manifest" if not bad else \
            f"{len(bad)} of its {len(checks)} files are missing or of another size ({', '.join(c.name for c in bad)})"
        return checks, DataError(path / MANIFEST, f"records no content hashes (the store was prepared before giblet "
                                 f"recorded them), so only sizes were checked: {sizes}",
                                 expected='a manifest with "hashes" (giblet records them when it prepares a store)',
                                 fix=f"prepare it again to record them: {rebuild_command(path, manifest)}")
    names = store_files(manifest)
    names += [name for name in recorded if name not in names]
    present = {name: (path / name).stat().st_size for name in names if (path / name).is_file()}
    with hash_bar(sum(present.values()), "verify the store's files", progress) as progress_bar:
        for name in names:
            record = recorded.get(name)
            if name not in present:
                checks.append(FileCheck(name, MISSING, "not found"))
            elif record is None:
                checks.append(FileCheck(name, MISMATCH, "no hash recorded for this file in the manifest"))
            elif present[name] != record["bytes"]:
                checks.append(FileCheck(name, MISMATCH, f"{present[name]:,} bytes, the manifest records {record['bytes']:,}"))
                progress_bar.advance(present[name] / 2**20)
            else:
                found = sha256_file(path / name, lambda n: progress_bar.advance(n / 2**20))
                if found == record["sha256"]:
                    checks.append(FileCheck(name, OK, f"sha256 {found[:PREFIX]}, {present[name]:,} bytes"))
                else:
                    checks.append(FileCheck(name, MISMATCH, f"sha256 {found[:PREFIX]}… found, the manifest records "
                                                            f"{record['sha256'][:PREFIX]}…"))
    bad = [c for c in checks if c.status != OK]
    if not bad:
        return checks, None
    if len(bad) == 1:
        return checks, DataError(path / bad[0].name, f"{bad[0].status}: {bad[0].detail}",
                                 expected="the file as `giblet data prepare` wrote it", fix=fix)
    listed = "; ".join(f"{c.name} {c.status} ({c.detail})" for c in bad)
    return checks, DataError(path, f"{len(bad)} of its {len(checks)} files differ from the manifest: {listed}",
                             expected="the files as `giblet data prepare` wrote them", fix=fix)
