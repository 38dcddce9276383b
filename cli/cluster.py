"""`giblet cluster sbatch`: a SLURM script that prepares once, then runs `srun torchrun` on N nodes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from giblet_cli.common import console, fail_cleanly

app = typer.Typer(help="Run training on a cluster.", no_args_is_help=True)

TEMPLATE = """#!/bin/bash
# Written by `giblet cluster sbatch`. Submit with: sbatch {script}
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={out}/slurm-%j.log
{extra}
set -euo pipefail

# One rendezvous host for torchrun's c10d backend: the job's first node.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={port}

# Prepare the store and write the run's config once, on the batch host, before any GPU work.
{python} -m giblet_cli.main train --data {data} --out {out} --store {store}{config} --prepare-only

# One torchrun per node; it starts {gpus_per_node} processes (one per GPU), ranks from the rendezvous.
srun --kill-on-bad-exit=1 {torchrun_line}
"""

TORCHRUN = (
    "{python} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc_per_node={gpus_per_node} "
    "--rdzv_id=\"$SLURM_JOB_ID\" --rdzv_backend=c10d --rdzv_endpoint=\"$MASTER_ADDR:$MASTER_PORT\" "
    "-m giblet.train.trainer --store {store} --out {out}{resume}"
)


def sbatch_script(data: Path, out: Path, nodes: int, gpus_per_node: int, config: Optional[Path] = None,
                  store: Optional[Path] = None, time: str = "24:00:00", cpus_per_task: int = 16, job_name: str = "giblet",
                  partition: Optional[str] = None, account: Optional[str] = None, port: int = 29500, resume: bool = False,
                  python: str = "python", script: str = "giblet.sbatch") -> str:
    store = store or out / "store"
    quote = lambda p: shlex.quote(str(p))  # noqa: E731
    extra = "\n".join(
        line for line in (f"#SBATCH --partition={partition}" if partition else "", f"#SBATCH --account={account}" if account else "") if line
    )
    torchrun = TORCHRUN.format(python=python, gpus_per_node=gpus_per_node, store=quote(store), out=quote(out),
                               resume=" --resume" if resume else "")
    return TEMPLATE.format(
        script=script, job_name=job_name, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time,
        out=quote(out), extra=extra, port=port, python=python, data=quote(data), store=quote(store),
        config=f" --config {quote(config)}" if config else "", torchrun_line=torchrun,
    )


@app.command()
@fail_cleanly
def sbatch(
    data: Path = typer.Option(..., "--data", help="Folder in the Sherlock layout (on a filesystem every node sees)."),
    out: Path = typer.Option(..., "--out", help="Run folder (shared filesystem)."),
    nodes: int = typer.Option(..., "--nodes", min=1, help="Nodes to run on."),
    gpus_per_node: int = typer.Option(..., "--gpus-per-node", min=1, help="GPUs (processes) per node."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration."),
    store: Optional[Path] = typer.Option(None, "--store", help="Store folder (default: OUT/store)."),
    time: str = typer.Option("24:00:00", "--time", help="SLURM time limit."),
    cpus_per_task: int = typer.Option(16, "--cpus-per-task", min=1, help="CPUs per node's task."),
    partition: Optional[str] = typer.Option(None, "--partition"),
    account: Optional[str] = typer.Option(None, "--account"),
    job_name: str = typer.Option("giblet", "--job-name"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt."),
    script: Path = typer.Option(Path("giblet.sbatch"), "--script", help="Where to write the script."),
    python: str = typer.Option("python", "--python", help="The Python that has giblet installed on the nodes."),
) -> None:
    """Write a SLURM batch script: prepare once, then `srun torchrun` with a c10d rendezvous on N nodes."""
    text = sbatch_script(data, out, nodes, gpus_per_node, config, store, time, cpus_per_task, job_name, partition, account,
                         resume=resume, python=python, script=str(script))
    script.write_text(text)
    console.print(f"wrote {script}: {nodes} nodes x {gpus_per_node} GPUs = world size {nodes * gpus_per_node}; submit with sbatch {script}")
