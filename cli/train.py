"""`giblet train`: prepare the store if needed, then train in place or under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from giblet_cli.common import console, fail_cleanly
from giblet.errors import ConfigError


def _wait_for_store(store: Path, timeout_s: float = 24 * 3600) -> None:
    """Nodes other than 0 wait for node 0 to finish the store (on a shared filesystem)."""
    started = time.monotonic()
    while not (store / "manifest.json").is_file():
        if time.monotonic() - started > timeout_s:
            raise ConfigError(f"{store}: no store appeared; node 0 prepares it on a filesystem all nodes share")
        time.sleep(5)


@fail_cleanly
def train(
    data: Path = typer.Option(..., "--data", help="Folder in the Sherlock layout."),
    out: Path = typer.Option(..., "--out", help="Run folder: config.yaml, checkpoints/, metrics.jsonl."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration; defaults work on any Sherlock-layout folder."),
    store: Optional[Path] = typer.Option(None, "--store", help="Where the prepared store lives (default: OUT/store)."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Processes per node, one per GPU (NCCL)."),
    procs: int = typer.Option(0, "--procs", min=0, help="CPU processes per node (gloo)."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes in the job."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's number, 0 .. nodes-1."),
    master: str = typer.Option("127.0.0.1:29500", "--master", help="ADDR:PORT of node 0's rendezvous."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt (same data and settings)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override train.epochs."),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="Prepare the store and write OUT/config.yaml, then stop."),
) -> None:
    """Train the model: one process here, or N per node under torchrun (DDP)."""
    from giblet.config import RESUMABLE, load_config, load_run_config, resume_differences
    from giblet.data.store import prepare
    from giblet.train.trainer import CONFIG_NAME, write_run_config

    if gpus and procs:
        raise ConfigError("give --gpus N (one process per GPU) or --procs N (CPU processes), not both")
    if gpus:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(f"--gpus {gpus} needs {gpus} CUDA GPUs; this machine has {found}. Use --procs N to train on CPUs")
    if node_rank >= nodes:
        raise ConfigError(f"--node-rank {node_rank} must be below --nodes {nodes}")
    if resume and not (out / "checkpoints" / "last.pt").is_file():
        # Before anything is written: a resume that silently started from scratch would look like a continued run.
        raise ConfigError(f"{out}: no checkpoints/last.pt to resume from; drop --resume to start a new run there, "
                          "or give --out the folder of the run to continue")
    if resume and config is None and (out / CONFIG_NAME).is_file():
        config = out / CONFIG_NAME  # resume with the run's own settings
    own = config is not None and Path(config).resolve() == (out / CONFIG_NAME).resolve()  # the run's, written by giblet
    settings = load_run_config(config) if own else load_config(config)
    if epochs is not None:
        settings.train.epochs = epochs
    store = store or out / "store"
    if node_rank == 0:
        prepare(data, settings, store)
        run_config = out / CONFIG_NAME
        if resume and run_config.is_file():
            changed = [] if own else resume_differences(load_run_config(run_config), settings)
            if changed:
                raise ConfigError(
                    f"{run_config}: the run's settings differ from {config} in {', '.join(changed)}; expected the settings "
                    f"the run started with (resume without --config to use them; only {', '.join(RESUMABLE)} may change)"
                )
        # Written on a resume too: a longer epoch cap (--epochs) is then the run's own.
        write_run_config(settings, out)
    else:
        _wait_for_store(store)
    if prepare_only:
        console.print(f"store {store} and {out / CONFIG_NAME} ready")
        return
    per_node = gpus or procs or 1
    if per_node == 1 and nodes == 1:
        from giblet.data.store import open_store
        from giblet.train.trainer import train as run_training

        result = run_training(settings, open_store(store), out, resume=resume)
        console.print(json.dumps({"world_size": 1, **result}))
        return
    address, _, port = master.rpartition(":")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}", f"--nnodes={nodes}",
        f"--node_rank={node_rank}", f"--master_addr={address}", f"--master_port={port}",
        "-m", "giblet.train.trainer", "--store", str(store), "--out", str(out),
    ] + (["--resume"] if resume else [])
    env = dict(os.environ)
    if procs:
        env["GIBLET_DEVICE"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    console.print("launching: " + " ".join(command))
    done = subprocess.run(command, env=env)
    if done.returncode:
        raise typer.Exit(done.returncode)
