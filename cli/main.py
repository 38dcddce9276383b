"""The ``giblet`` command line: the app, assembled from one module per command or command group."""

from __future__ import annotations

import typer

from giblet_cli import cluster as cluster_commands
from giblet_cli import data as data_commands
from giblet_cli.bench import bench as bench_command
from giblet_cli.common import console
from giblet_cli.demo import demo as demo_command
from giblet_cli.evaluate import evaluate as evaluate_command
from giblet_cli.lesion import lesion as lesion_command
from giblet_cli.model import model as model_command
from giblet_cli.report import report as report_command
from giblet_cli.train import train as train_command
from giblet_cli.validate import validate as validate_command

app = typer.Typer(
    name="giblet",
    help="Learn how each part of the brain sees a movie: a multimodal autoencoder whose layer 7 is the fMRI response.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        import giblet

        console.print(f"giblet {giblet.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Learn how each part of the brain sees a movie: a multimodal autoencoder whose layer 7 is the fMRI response."""


app.add_typer(data_commands.app, name="data")
app.add_typer(cluster_commands.app, name="cluster")
app.command(name="train")(train_command)
app.command(name="demo")(demo_command)
app.command(name="evaluate")(evaluate_command)
app.command(name="validate")(validate_command)
app.command(name="model")(model_command)
app.command(name="bench")(bench_command)
app.command(name="lesion")(lesion_command)
app.command(name="report")(report_command)


if __name__ == "__main__":
    app()
