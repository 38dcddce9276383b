"""Errors that tell the user which file is wrong, what was found, what was expected and how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class GibletError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback and exits 2."""


class DataError(GibletError):
    """Bad input data: names the file, the value found and what was expected.

    >>> str(DataError("data/a.nii.gz", "TR is 0.0 s", expected="a positive TR in zooms[3]"))
    'data/a.nii.gz: TR is 0.0 s; expected a positive TR in zooms[3]'
    """

    def __init__(
        self,
        path: Union[str, Path, None],
        problem: str,
        expected: Optional[str] = None,
        fix: Optional[str] = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.expected = expected
        self.fix = fix
        message = problem if self.path is None else f"{self.path}: {problem}"
        if expected:
            message += f"; expected {expected}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class ConfigError(GibletError):
    """A bad configuration value or key (unknown keys come with the nearest valid key)."""
