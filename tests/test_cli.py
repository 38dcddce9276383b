"""The giblet command line: help, validate, bench."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from giblet import ops_reference
from giblet_cli.main import app

runner = CliRunner()


def test_console_script_prints_help():
    script = Path(sys.executable).parent / "giblet"
    assert script.exists(), f"the giblet console script is not installed next to {sys.executable}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validate" in done.stdout and "bench" in done.stdout


def test_version():
    import giblet

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"giblet {giblet.__version__}"


def test_validate_reports_the_build_and_passes():
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert "CPU kernels" in result.output and torch.__version__ in result.output
    for op in ("gather_project", "grid_index", "resample_codes", "grid_average", "bottleneck"):
        assert op in result.output
    assert "all 5 op checks passed" in result.output


def test_validate_exits_1_on_a_mismatch(monkeypatch):
    wrong = lambda *args, **kwargs: ops_reference.F.linear(args[0], args[1], args[2]) + 1  # noqa: E731
    monkeypatch.setattr(ops_reference, "bottleneck", wrong)
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "bottleneck on cpu" in result.output


def test_bench_writes_rows_ratios_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--size", "small", "--repeats", "1", "--case", "resample_codes", "--case", "gather_project", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    variants = {(row["case"], row["variant"]) for row in report["rows"]}
    assert variants == {
        ("resample_codes", "giblet"), ("resample_codes", "reference"), ("resample_codes", "numpy loop"),
        ("gather_project", "giblet"), ("gather_project", "reference"), ("gather_project", "torch.mm"),
    }
    for row in report["rows"]:
        assert row["median_s"] > 0
        assert (row["peak_extra_bytes"] is None) == (row["variant"] == "torch.mm")
    ratios = {(r["case"], r["baseline"]): r for r in report["ratios"]}
    assert ratios[("gather_project", "reference")]["memory"] < 1  # the reference materializes the gathered rows


def test_bench_data_case_needs_a_store():
    result = runner.invoke(app, ["bench", "--case", "data"])
    assert result.exit_code == 2
    assert "--store" in " ".join(result.output.replace("│", " ").split())


def test_the_memory_probe_runs_as_a_module():
    # `giblet bench` measures each variant's memory in `python -m giblet.bench --probe CASE VARIANT SIZE`.
    done = subprocess.run([sys.executable, "-m", "giblet.bench", "--probe", "resample_codes", "giblet", "small"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"] >= 0
    assert "RuntimeWarning" not in done.stderr


def test_bench_rejects_an_unknown_size():
    result = runner.invoke(app, ["bench", "--size", "huge"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # unwrap rich's error box
    assert "Invalid value for '--size'" in text and "'huge' is not one of 'sherlock', 'small'" in text


PEAK_PROBE = """
import torch
from giblet.bench.ops import peak_extra_in_process

def scratch():
    torch.ones(64 * 2**20 // 4).sum()  # a 64 MiB temporary
    return []

def result():
    return [torch.ones(64 * 2**20 // 4)]  # 64 MiB returned: not extra

cpu = torch.device("cpu")
print(peak_extra_in_process(scratch, cpu), peak_extra_in_process(result, cpu))
"""


def test_peak_extra_counts_scratch_memory_not_results():
    # A fresh process with the allocator settings of the bench's probes: in this
    # process, memory freed by earlier tests would be reused and hide the peak.
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE], env=env, capture_output=True, text=True, check=True)
    scratch, result = (int(v) for v in done.stdout.split())
    assert scratch > 48 * 2**20
    assert result < 8 * 2**20
