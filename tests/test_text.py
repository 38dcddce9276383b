"""Scene annotations (xlsx and csv, Sherlock's column names) and their sentence embeddings.

Embedding tests use the real all-MiniLM-L6-v2 bundled offline (384 dimensions).
"""

import csv

import numpy as np
import openpyxl
import pytest

from giblet.data import text
from giblet.errors import DataError

# Sherlock's headers, with the stray spaces real spreadsheets carry.
HEADER = ["Segment", "Start Time (s) ", " End Time (s)", "Scene Details - A Level ", "Name - All", "Location", "Notes"]

# Out of order on purpose; segments 1-2 overlap and 3 starts after a gap.
ROWS = [
    [3, 20.5, 30.0, "John walks to the flat", "John", "Baker Street", "x"],
    [1, 0.0, 12.0, "A war memory", "John", "Afghanistan", None],
    [2, 10.0, 14.5, "John wakes up", "John", "Bedsit", None],
    [4, 31.0, 31.0, "   ", "Sherlock", "Lab", None],  # no text: skipped
    [None, None, None, None, None, None, None],  # blank padding row: ignored
    [5, None, 40.0, "Sherlock in the lab", "Sherlock", "Lab", None],  # no start time: skipped
    [6, 16.0, 18.0, "Molly brings a riding crop", "Molly", "Morgue", None],
]


def write_xlsx(path, header=HEADER, rows=ROWS, sheet_title="Sheet1"):
    workbook = openpyxl.Workbook()
    worksheet = workbook.active
    worksheet.title = sheet_title
    worksheet.append(header)
    for row in rows:
        worksheet.append(row)
    workbook.save(path)
    return path


def write_csv(path, header=HEADER, rows=ROWS):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if cell is None else cell for cell in row] for row in rows])
    return path


@pytest.fixture(params=["xlsx", "csv"])
def annotation_file(request, tmp_path):
    writer = write_xlsx if request.param == "xlsx" else write_csv
    return writer(tmp_path / f"annotations.{request.param}")


# read_annotations


def test_segments_are_sorted_by_start_and_keep_overlaps_and_gaps(annotation_file):
    annotations = text.read_annotations(annotation_file)
    assert annotations.path == str(annotation_file)
    np.testing.assert_array_equal(annotations.starts, [0.0, 10.0, 16.0, 20.5])
    np.testing.assert_array_equal(annotations.ends, [12.0, 14.5, 18.0, 30.0])
    assert annotations.starts.dtype == annotations.ends.dtype == np.float64
    assert annotations.texts == ["A war memory", "John wakes up", "Molly brings a riding crop", "John walks to the flat"]


def test_rows_without_time_or_text_are_counted_named_and_blank_rows_ignored(annotation_file):
    annotations = text.read_annotations(annotation_file)
    assert annotations.n_skipped == 2
    assert annotations.skipped_rows == ((5, "no text"), (7, "no start or end time"))  # the header is row 1


def test_text_columns_are_joined_and_headers_match_ignoring_case(tmp_path):
    header = ["start time (S)", "END TIME (S)", "scene details - a level", "name - all", "location"]
    path = write_xlsx(tmp_path / "a.xlsx", header=header, rows=[[1, 2, "Sherlock texts", "Sherlock", None]])
    annotations = text.read_annotations(path, text_columns=("Scene Details - A Level", "Name - All", "Location"))
    assert annotations.texts == ["Sherlock texts. Sherlock"]


def test_segments_with_equal_starts_keep_file_order(tmp_path):
    rows = [[1, 5.0, 6.0, "second"], [2, 5.0, 9.0, "third"], [3, 1.0, 2.0, "first"]]
    path = write_csv(tmp_path / "a.csv", header=HEADER[:4], rows=rows)
    assert text.read_annotations(path).texts == ["first", "second", "third"]


def test_sheet_is_chosen_by_name(tmp_path):
    path = tmp_path / "a.xlsx"
    workbook = openpyxl.Workbook()
    workbook.active.append(["unrelated"])
    worksheet = workbook.create_sheet("scenes")
    worksheet.append(HEADER)
    worksheet.append(ROWS[0])
    workbook.save(path)
    assert text.read_annotations(path, sheet="scenes").texts == ["John walks to the flat"]
    with pytest.raises(DataError, match="no sheet named 'shots'"):
        text.read_annotations(path, sheet="shots")


def test_missing_column_lists_the_columns_found_and_the_key_to_set(tmp_path):
    path = write_xlsx(tmp_path / "a.xlsx", header=["Onset", "Offset", "Scene Details - A Level"], rows=[[0, 1, "x"]])
    with pytest.raises(DataError) as caught:
        text.read_annotations(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: no column 'Start Time (s)'")
    assert "columns found: 'Onset', 'Offset', 'Scene Details - A Level'" in message
    assert "set text.start_column" in message


def test_missing_text_column_names_its_key(tmp_path):
    path = write_csv(tmp_path / "a.csv", header=HEADER[:3], rows=[[1, 0, 1]])
    with pytest.raises(DataError, match="set text.text_columns"):
        text.read_annotations(path)


def test_end_before_start_names_the_row(tmp_path):
    path = write_xlsx(tmp_path / "a.xlsx", rows=[ROWS[0], [9, 50.0, 45.0, "backwards", None, None, None]])
    with pytest.raises(DataError, match=r"row 3: segment ends at 45 s before it starts at 50 s") as caught:
        text.read_annotations(path)
    assert str(caught.value).startswith(str(path))


def test_non_numeric_time_names_the_row_and_value(tmp_path):
    path = write_csv(tmp_path / "a.csv", rows=[ROWS[0], [9, "1:05", 70.0, "clock time", None, None, None]])
    with pytest.raises(DataError, match=r"row 3: 'Start Time \(s\)' is '1:05'; expected a time in seconds"):
        text.read_annotations(path)


def test_unknown_extension_and_missing_file(tmp_path):
    odd = tmp_path / "annotations.ods"
    odd.write_bytes(b"")
    with pytest.raises(DataError, match="expected .xlsx or .csv"):
        text.read_annotations(odd)
    with pytest.raises(DataError, match="annotation file not found"):
        text.read_annotations(tmp_path / "missing.xlsx")


# embeddings


@pytest.fixture(scope="module")
def embedder():
    return text.load_embedder()


def test_bundled_embedder_gives_unit_rows_of_384(embedder):
    sentences = ["Sherlock examines the body.", "John writes his blog.", "A taxi drives through London."]
    embeddings = text.embed_texts(sentences, embedder, progress=False)
    assert text.embedding_size(embedder) == 384
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_identical_texts_are_embedded_once(embedder, monkeypatch):
    received = []
    encode = embedder.encode

    def spy(sentences, *args, **kwargs):
        received.extend(sentences)
        return encode(sentences, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode", spy)
    sentences = ["John wakes up", "Sherlock texts", "John wakes up", "John wakes up", "Molly"]
    embeddings = text.embed_texts(sentences, embedder, batch_size=2, progress=False)
    assert sorted(received) == ["John wakes up", "Molly", "Sherlock texts"]
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    np.testing.assert_array_equal(embeddings[0], embeddings[3])
    assert not np.array_equal(embeddings[0], embeddings[1])


def test_closer_meanings_have_higher_cosine(embedder):
    guitar, instrument, markets = text.embed_texts(
        ["A man is playing a guitar.", "Someone plays a musical instrument.", "Stock markets fell sharply today."],
        embedder, progress=False)
    assert guitar @ instrument > guitar @ markets + 0.2


def test_no_texts_give_an_empty_matrix(embedder):
    assert text.embed_texts([], embedder, progress=False).shape == (0, 384)


def test_unavailable_hub_model_names_the_config_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        text.load_embedder("giblet-tests/no-such-model")
    message = str(caught.value)
    assert "text.embedder = 'giblet-tests/no-such-model'" in message
    assert "set text.embedder to a local model directory" in message
