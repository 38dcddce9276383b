"""The trainer: checkpoints and metrics, DDP over processes equals one process, exact resume after SIGKILL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import giblet
from giblet.config import dump_config, from_dict, load_config
from giblet.models import Stimuli
from giblet.models.checkpoint import read_checkpoint
from giblet.train.losses import LossScales
from giblet.train.trainer import VoxelCorrelation, lr_factor
from giblet_cli.main import app

runner = CliRunner()

TRAIN = {
    "model": {
        "frame_features": 16, "modality_width": 32, "hidden": [64, 64, 64],
        "slot_features": 8, "dropout": 0.0, "audio_input": "mel",
    },
    # The correlation term is computed over each process's share of the batch, so it is another objective
    # for another process count: off here, where one and two processes must train the same weights.
    "loss": {"fmri_correlation": 0.0},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.002, "log_every_steps": 4, "deterministic": True},
}


@pytest.fixture
def run_config(tiny_config, tmp_path):
    """The tiny store's settings plus a small model: `giblet train` reuses the prepared store."""
    values = tiny_config.to_dict()
    for section, overrides in TRAIN.items():
        values[section].update(overrides)
    path = tmp_path / "train.yaml"
    path.write_text(dump_config(from_dict(values)))
    return path


def _train(tiny_data, tiny_store, out, config, *extra, env=None):
    command = [sys.executable, "-m", "giblet_cli.main", "train", "--data", str(tiny_data), "--out", str(out),
               "--store", str(tiny_store.path), "--config", str(config), *extra]
    environment = dict(os.environ, OMP_NUM_THREADS="1", GIBLET_PROGRESS="0", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def _weights(run):
    return read_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_writes_checkpoints_metrics_and_config(tiny_data, tiny_store, run_config, tmp_path):
    out = tmp_path / "run"
    done = _train(tiny_data, tiny_store, out, run_config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "best.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    epochs = [r for r in records if "val_r" in r]
    assert len(epochs) == 2 and epochs[-1]["epoch"] == 2
    assert all(np.isfinite(r["loss"]) and r["trs_per_s"] > 0 for r in steps)
    assert steps[-1]["lr"] < steps[0]["lr"]  # the cosine schedule, stepped per optimizer step
    state = read_checkpoint(out / "checkpoints" / "last.pt")
    assert state["store_key"] == tiny_store.key and state["epoch"] == 2
    assert {"optimizer", "scheduler", "rng", "step", "config", "raw_model"} <= set(state)
    assert any(key.startswith("modality_readouts.") for key in state["model"])
    # best.pt is what evaluating and lesioning read: the averaged weights alone, without the training-only readouts.
    best = read_checkpoint(out / "checkpoints" / "best.pt")
    assert not {"optimizer", "scheduler", "rng", "raw_model"} & set(best) and {"step", "epoch", "config", "store_key"} <= set(best)
    assert not any(key.startswith("modality_readouts.") for key in best["model"])
    model = giblet.load(out)
    assert model.n_units == tiny_store.n_voxels
    # L1 reads mel standardized by the statistics of the training windows, the ones the mel loss uses.
    model.attach(Stimuli.from_store(tiny_store, model.dims))
    scales = LossScales.from_store(tiny_store, model)
    assert torch.allclose(model.l1_mel.mean, torch.tensor(scales.mel_mean)) and model.l1_mel.mean.mean() < -10
    assert torch.allclose(model.l1_mel.std, torch.tensor(scales.mel_std))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    val_r = [event.value for event in board.Scalars("val/val_r")]
    assert val_r == pytest.approx([r["val_r"] for r in epochs], abs=1e-6)
    assert len(board.Scalars("train/loss")) == len(steps)


def _one_epoch(tiny_data, tiny_store, tiny_config, tmp_path, model=None, loss=None):
    """A one-epoch run of the small test model with these ``model`` and ``loss`` settings; its folder."""
    values = tiny_config.to_dict()
    for section, overrides in TRAIN.items():
        values[section].update(overrides)
    values["model"].update(model or {})
    values["loss"].update(loss or {})
    values["train"]["epochs"] = 1
    config = tmp_path / "one_epoch.yaml"
    config.write_text(dump_config(from_dict(values)))
    out = tmp_path / "run"
    done = _train(tiny_data, tiny_store, out, config)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_model_inputs_train_a_single_modality_model(tiny_data, tiny_store, tiny_config, tmp_path):
    # An audio-only model: the teacher (half of ridge_banded's fit of the store's blocks) still trains it.
    out = _one_epoch(tiny_data, tiny_store, tiny_config, tmp_path, {"inputs": ["audio"]}, {"fmri_teacher": 0.5})
    model = giblet.load(out)
    assert model.modalities == ["mel"] and model.config.inputs == ["audio"]
    assert load_config(out / "config.yaml").loss.fmri_teacher == 0.5
    assert not any(name.startswith(("l1_video", "l1_text", "l13_video", "l13_text")) for name in model.state_dict())


def test_two_processes_end_with_the_weights_of_one(tiny_data, tiny_store, run_config, tmp_path):
    # The network alone: no linear prior, readouts or weight average (each is the same on every rank by
    # construction), so what is compared is the gradient all-reduce and the sharded sampler.
    config = run_config.read_text()
    for before, after in (("linear_branch: true", "linear_branch: false"), ("modality_readouts: true", "modality_readouts: false"),
                          ("fmri_teacher: 0.5", "fmri_teacher: 0.0"), ("ema_decay: 0.99", "ema_decay: 0.0")):
        assert before in config, before
        config = config.replace(before, after)
    run_config.write_text(config)
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(tiny_data, tiny_store, one, run_config).returncode == 0
    done = _train(tiny_data, tiny_store, two, run_config, "--procs", "2", "--master", f"127.0.0.1:{_free_port()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"world_size": 2' in done.stdout
    a, b = _weights(one), _weights(two)
    # Float sums in another order: a few of the ~700k weights that get near-zero gradients move a little
    # differently under Adam (its step divides by their tiny second moments), the typical weight agrees
    # to ~1e-8. A missing or doubled all-reduce or a wrong shard moves every weight by ~1e-3 or more.
    for name in a:
        if a[name].is_floating_point():
            difference = (b[name] - a[name]).double()
            assert difference.abs().median() < 1e-6, name
            assert difference.norm() <= 1e-4 * a[name].double().norm() + 1e-7, name
            assert difference.abs().max() < 1e-4, name
        else:
            assert torch.equal(a[name], b[name]), name


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tiny_data, tiny_store, run_config, tmp_path):
    config = run_config.read_text().replace("checkpoint_every_steps: 0", "checkpoint_every_steps: 1")
    run_config.write_text(config)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _train(tiny_data, tiny_store, whole, run_config).returncode == 0
    command = [sys.executable, "-m", "giblet_cli.main", "train", "--data", str(tiny_data), "--out", str(killed),
               "--store", str(tiny_store.path), "--config", str(run_config)]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1", GIBLET_PROGRESS="0"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if last.is_file():
            try:
                step = read_checkpoint(last)["step"]
            except Exception:  # being replaced right now
                step = 0
            if step >= 5:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_checkpoint(last)
    assert 5 <= state["step"] and state["epoch"] == 0, "killed mid-way through the first epoch"
    done = _train(tiny_data, tiny_store, killed, run_config, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(whole), _weights(killed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_another_store_or_other_settings(tiny_data, tiny_store, run_config, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_data, tiny_store, out, run_config).returncode == 0
    changed = run_config.read_text().replace("lr: 0.002", "lr: 0.001")
    other = tmp_path / "other.yaml"
    other.write_text(changed)
    done = _train(tiny_data, tiny_store, out, other, "--resume")
    assert done.returncode != 0 and "settings differ" in done.stderr and "train.lr" in done.stderr


def test_a_finished_run_extends_with_resume_and_a_higher_epoch_cap_and_remembers_its_store(tiny_data, tiny_store, run_config, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_data, tiny_store, out, run_config).returncode == 0
    done = _train(tiny_data, tiny_store, out, out / "config.yaml", "--resume", "--epochs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 3
    assert load_config(out / "config.yaml").train.epochs == 3  # the run's own settings now
    # Trained with --store elsewhere: evaluate finds that store from the run folder alone.
    result = runner.invoke(app, ["evaluate", str(out), "--baseline", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "store.json").read_text())["key"] == tiny_store.key


def test_resume_without_a_checkpoint_is_refused_before_anything_is_written(tiny_data, tiny_store, run_config, tmp_path):
    out = tmp_path / "never-trained"
    done = _train(tiny_data, tiny_store, out, run_config, "--resume")
    assert done.returncode != 0 and str(out) in done.stderr and "last.pt" in done.stderr
    assert not out.exists()


def test_gpus_without_cuda_say_so(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--gpus", "8"])
    assert result.exit_code == 2 and "needs 8 CUDA GPUs" in result.output and "--procs" in result.output


def test_two_loopback_nodes_make_world_size_4_with_ranks_0_to_3(tiny_data, tiny_store, run_config, tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GIBLET_PROGRESS="0")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "giblet_cli.main", "train", "--data", str(tiny_data), "--out", str(out), "--store",
             str(tiny_store.path), "--config", str(run_config), "--procs", "2", "--nodes", "2", "--node-rank", str(r),
             "--master", f"127.0.0.1:{port}", "--epochs", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for r in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    line = next(l for l in outputs[0][0].splitlines() if l.startswith("{") and "ranks" in l)
    report = json.loads(line)
    assert report["world_size"] == 4
    assert sorted(p["rank"] for p in report["ranks"]) == [0, 1, 2, 3]
    assert sorted(p["local_rank"] for p in report["ranks"]) == [0, 0, 1, 1]


def test_learning_rate_warms_up_then_follows_a_cosine():
    factors = [lr_factor(step, 100, 0.1, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


def test_voxel_correlation_combines_sums_like_one_pass():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    t[:, 0] = 2 * p[:, 0] + 1
    whole, halves = VoxelCorrelation(7, "cpu"), VoxelCorrelation(7, "cpu")
    whole.add(torch.from_numpy(p), torch.from_numpy(t))
    halves.add(torch.from_numpy(p[:20]), torch.from_numpy(t[:20]))
    other = VoxelCorrelation(7, "cpu")
    other.add(torch.from_numpy(p[20:]), torch.from_numpy(t[20:]))
    halves.sums += other.sums  # what all_reduce does across ranks
    expected = [np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(7)]
    np.testing.assert_allclose(whole.r().numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(halves.r().numpy(), expected, atol=1e-12)


def test_the_sbatch_script_runs_on_two_loopback_nodes_with_a_c10d_rendezvous(tiny_data, tiny_store, run_config, tmp_path):
    from giblet_cli.cluster import sbatch_script

    out = tmp_path / "run"
    script = sbatch_script(tiny_data, out, nodes=2, gpus_per_node=2, config=run_config, store=tiny_store.path,
                           python=sys.executable, partition="gpu")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=2" in script and "#SBATCH --partition=gpu" in script
    assert "--rdzv_backend=c10d" in script and '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"' in script
    lines = script.splitlines()
    prepare = next(line for line in lines if "--prepare-only" in line)
    srun = next(line for line in lines if line.startswith("srun "))
    assert '--nnodes="$SLURM_NNODES"' in srun and '--rdzv_id="$SLURM_JOB_ID"' in srun
    assert "-m giblet.train.trainer" in srun and prepare.split()[0] == sys.executable

    # Run the script's own lines on two loopback "nodes" of 2 CPU processes: what srun would start on
    # each node, with SLURM's variables set. On distinct hosts the node whose name is MASTER_ADDR hosts
    # the c10d store; on one host both would claim it, so each agent is told (--rdzv_conf=is_host).
    env = dict(os.environ, SLURM_NNODES="2", SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               GIBLET_DEVICE="cpu", OMP_NUM_THREADS="1", GIBLET_PROGRESS="0")
    assert subprocess.run(["bash", "-c", prepare], env=env, capture_output=True, text=True, timeout=600).returncode == 0
    torchrun = srun.removeprefix("srun --kill-on-bad-exit=1 ")
    agents = []
    for node in (0, 1):
        line = torchrun.replace("-m torch.distributed.run ", f"-m torch.distributed.run --rdzv_conf=is_host={1 - node} ", 1)
        agents.append(subprocess.Popen(["bash", "-c", line], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(2 if node == 0 else 0)  # the host agent first, as node 0 of a job usually is
    outputs = [agent.communicate(timeout=600) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    reports = [json.loads(line) for stdout, _ in outputs for line in stdout.splitlines() if line.startswith('{"world_size"')]
    assert len(reports) == 1 and reports[0]["world_size"] == 4
    assert sorted(r["rank"] for r in reports[0]["ranks"]) == [0, 1, 2, 3]
    assert sorted(r["local_rank"] for r in reports[0]["ranks"]) == [0, 0, 1, 1]
    assert (out / "checkpoints" / "last.pt").is_file()


def test_weight_average_follows_the_weights_and_swaps_in_and_out():
    from giblet.train.trainer import WeightAverage

    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(step=1000)  # decay 0.9 once past the ramp
    expected = start + 0.1 * 1.0
    with average.swapped_in():
        torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), start + 1.0)  # the optimizer's weights are back
    average.update(step=0)  # the ramp: decay (1 + 0) / 10 = 0.1 at the first step
    torch.testing.assert_close(average.average["weight"], 0.1 * expected + 0.9 * (start + 1.0))


def test_a_run_with_the_linear_branch_starts_from_the_banded_ridge_and_evaluates(tiny_data, tiny_store, tiny_config, tmp_path):
    from giblet.eval.runs import load_run
    from giblet.linear import BandedRidge, banded_ridge, regressor_parts

    # With the teacher as well: the branch and the teacher come from one banded fit.
    out = _one_epoch(tiny_data, tiny_store, tiny_config, tmp_path, {"linear_branch": True}, {"fmri_teacher": 0.5})
    model, store, _ = load_run(out, tiny_store.path)  # lesion's loader attaches the regressors named by the run's settings
    assert model.linear_weight.shape[1] == tiny_store.n_voxels and model.stimuli.regressors is not None
    result = runner.invoke(app, ["evaluate", str(out), "--store", str(tiny_store.path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    # One epoch from a silent network: layer 7 is still close to the banded ridge it started from.
    parts = regressor_parts(tiny_store, model.stimuli.frame_targets)
    banded = banded_ridge(tiny_store, parts, "glover", ("test",))[0]["test"]
    start, stop = tiny_store.splits["test"]
    prediction = np.asarray(nib.load(str(out / "eval" / "prediction_test.nii.gz")).dataobj)[tiny_store.mask()[0]].T
    assert prediction.shape == (stop - start, tiny_store.n_voxels)
    assert float(np.mean([np.corrcoef(prediction[:, v], banded[:, v])[0, 1] for v in range(0, tiny_store.n_voxels, 97)])) > 0.8
    # Each unit reads the trunks of the streams that fit weighs at its voxel, the largest in full.
    fit = BandedRidge(tiny_store.tr_s, "glover", preshift_trs=tiny_store.preshift_trs).fit(
        parts, np.asarray(tiny_store.fmri_mean(), dtype=np.float32), rows=slice(*tiny_store.splits["train"]))
    expected = fit.block_weights_ / fit.block_weights_.max(axis=0)
    order = [list(parts).index("audio" if m in ("codes", "mel") else m) for m in model.modalities]
    np.testing.assert_allclose(model.stream_gate.numpy(), expected[order], atol=1e-6)
    assert np.isfinite(metrics["mean_r"])
