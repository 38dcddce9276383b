"""`giblet report RUN`: one offline HTML page of a run (settings, training, brain maps, what each region carries)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from giblet_cli.common import console, fail_cleanly


@fail_cleanly
def report(
    run: Path = typer.Argument(..., help="Run folder (giblet train --out)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/report); replaced only if it is a report."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
) -> None:
    """Write RUN/report/index.html: the run, its training curves, the r maps beside the noise ceiling and the baselines,
    and the lesion-atlas maps with the top parcels' frames, sound and texts. Opens offline; missing parts say what to run."""
    from giblet.eval.report import write_report

    index = write_report(run, out, store)
    console.print(f"report: {escape(str(index))}  (open it in a browser; it needs no network)")
