"""`giblet validate --data`: a pass/fail table for the folder before any training, exit 1 on any failure."""

import shutil

from typer.testing import CliRunner

from giblet_cli.main import app

runner = CliRunner()


def test_synthetic_data_passes(tiny_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("audio:\n  features: [mel, codes]\n  encodec_model: random\n")
    result = runner.invoke(app, ["validate", "--data", str(tiny_data), "--config", str(config)])
    assert result.exit_code == 0, result.output
    output = result.output
    for row in ("layout", "movie", "soundtrack", "annotations", "fMRI headers", "alignment", "frames per TR", "codes per TR",
                "splits", "shared mask", "text embedder", "EnCodec"):
        assert row in output, row
    assert "37-38 per 1.5 s TR" in output  # 25 fps: 37.5 frames per TR, from exact times
    assert "112-113 EnCodec frames per TR" in output
    assert "FAIL" not in output and "data checks passed" in output
    # The model for this folder, from the measured dimensions: one L7 unit per voxel of the shared mask.
    import nibabel as nib

    voxels = int((nib.load(str(tiny_data / "_truth" / "brain_mask.nii.gz")).get_fdata() > 0).sum())
    assert "L7 brain" in output and f"1x{voxels}" in output
    assert "L13 codes" in output and "1x112x8x1024" in output


def test_a_broken_folder_fails_with_every_problem_listed(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("_truth"))
    subject = sorted((data / "sherlock_nii").glob("*.nii.gz"))[0]
    raw = subject.read_bytes()
    subject.write_bytes(raw[: len(raw) // 2])
    (data / "annotations.xlsx").write_bytes(b"not a spreadsheet")
    result = runner.invoke(app, ["validate", "--data", str(data)])
    assert result.exit_code == 1, result.output
    assert "annotations.xlsx" in result.output
    assert subject.name in result.output
    assert "data checks failed" in result.output


def test_missing_layout_fails(tmp_path):
    result = runner.invoke(app, ["validate", "--data", str(tmp_path), "--quick"])
    assert result.exit_code == 1
    assert "stimuli_Sherlock.m4v" in result.output and "file not found" in result.output


def test_an_unknown_config_key_is_an_error_naming_the_nearest_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("window:\n  lookbak_s: 4\n")
    result = runner.invoke(app, ["validate", "--config", str(config)])
    assert result.exit_code == 2
    assert "window.lookback_s" in result.output


def test_model_command_sizes_the_model_of_a_store(tiny_store):
    result = runner.invoke(app, ["model", "--store", str(tiny_store.path)])
    assert result.exit_code == 0, result.output
    assert f"1x{tiny_store.n_voxels}" in result.output
    assert "activation memory per training sample" in result.output and "parameters:" in result.output


def test_an_empty_annotation_cell_is_a_warning_that_names_its_row(tiny_data, tmp_path):
    import openpyxl

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("_truth"))
    workbook = openpyxl.load_workbook(data / "annotations.xlsx")
    sheet = workbook.active
    header = [str(cell.value).strip() for cell in sheet[1]]
    sheet.cell(row=4, column=header.index("Scene Details - A Level") + 1).value = None  # the third segment loses its text
    workbook.save(data / "annotations.xlsx")
    result = runner.invoke(app, ["validate", "--data", str(data), "--quick"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0, result.output  # a warning, not a failure
    assert "annotations.xlsx rows 4 (no text)" in text and "warn" in text
