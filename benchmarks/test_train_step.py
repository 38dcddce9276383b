"""pytest-benchmark of the model's training step, native ops vs references swapped in (giblet.bench.train_step).

    pytest benchmarks/test_train_step.py --benchmark-only
    GIBLET_TRAIN_BATCH=8 GIBLET_TRAIN_CONFIG=configs/demo.yaml pytest benchmarks/test_train_step.py --benchmark-only

One group, two rows (giblet, reference): forward, loss, backward, clipping and
AdamW step on the same batch from the same weights (synthetic data at the tiny
preset's sizes; the default settings' model unless GIBLET_TRAIN_CONFIG names
others). Both variants are first checked to give the same loss and gradients.
Each row's extra_info holds TRs/s (batch size / median step) and the thread count.
"""

import functools
import os

import pytest
import torch

from giblet.bench.train_step import VARIANTS, build_trainees, check_agreement, num_threads, step_runner, synthetic_data
from giblet.config import load_config

DEVICE = torch.device(os.environ.get("GIBLET_BENCH_DEVICE", "cpu"))
CONFIG = os.environ.get("GIBLET_TRAIN_CONFIG") or None
BATCH = int(os.environ.get("GIBLET_TRAIN_BATCH", "0")) or None


@functools.lru_cache(maxsize=1)
def trainees():
    """Both variants' models, built once; their agreement checked before anything is timed."""
    config = load_config(CONFIG)
    data = synthetic_data(config, BATCH or config.train.batch_size)
    built = build_trainees(data, config, DEVICE)
    check_agreement(built["giblet"])
    return data.description, len(data.batch["fmri"]), built


@pytest.fixture(scope="module")
def threads():
    with num_threads(None) as used:
        yield used


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, threads, variant):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("GIBLET_BENCH_DEVICE=cuda but no CUDA GPU on this machine")
    description, batch_size, built = trainees()
    run = step_runner(built[variant], variant)
    if DEVICE.type == "cuda":
        step = run

        def run():
            step()
            torch.cuda.synchronize()

    benchmark.group = f"train_step: batch {batch_size}, {threads} threads, {description}"
    benchmark.extra_info.update(device=str(DEVICE), threads=threads, batch_size=batch_size)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed run)
        benchmark.extra_info["trs_per_s"] = batch_size / benchmark.stats.stats.median
