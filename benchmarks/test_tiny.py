"""pytest-benchmark of the wall-clock costs of the tiny synthetic preset that tests once asserted.

    pytest benchmarks/test_tiny.py --benchmark-only
    GIBLET_TINY_ROUNDS=3 pytest benchmarks/test_tiny.py --benchmark-only

The tests check what these runs produce (tests/test_synth.py: the dataset; tests/test_model.py:
test_a_tiny_two_subject_model_overfits_32_trs, that the fMRI loss falls tenfold); the time they
take is measured here, on a machine that is not shared, against the goals in GOALS_S (each row's
extra_info has the goal and whether the median met it; nothing fails on a slow run):

* ``synthesize``: ``giblet data synth --preset tiny`` (the demo's first stage), under 60 s;
* ``overfit``: a small model on the tiny preset's first two subjects (mel audio) trained with Adam
  on one batch of 32 training windows until the fMRI loss is a tenth of its first value
  (at most 400 steps), under 60 s;
* ``read_batch``: one random batch of 16 windows read from that store (indices and fMRI), as
  ``giblet bench --case data`` reads it.
"""

import os

import numpy as np
import pytest
import torch

from giblet.bench.train_step import steps_to_fit
from giblet.config import LossConfig, ModelConfig, from_dict
from giblet.data.dataset import WindowDataset
from giblet.data.store import prepare
from giblet.data.synth import synthesize
from giblet.models import GibletAutoencoder, Stimuli, dims_from_manifest
from giblet.train.losses import GibletLoss, LossScales

ROUNDS = int(os.environ.get("GIBLET_TINY_ROUNDS", "1"))
GOALS_S = {"synthesize": 60.0, "overfit": 60.0}
MAX_STEPS = 400

# The model of tests/test_model.py's overfitting test: narrow layers, 128-unit hidden layers, no dropout, the plain
# network (the linear branch and the modality readouts are on by default).
SMALL = ModelConfig(
    frame_features=16, modality_width=32,
    hidden=[128, 128, 128], dropout=0.0, slot_features=16,
    linear_branch=False, modality_readouts=False,
)
STORE_SETTINGS = {"data": {"subjects": [1, 2]}, "audio": {"features": ["mel"]}, "window": {"lookback_s": 8.0, "hrf_length_s": 20.0}}

SYNTHESIZED = {}  # the folder the synthesis benchmark wrote, reused by the store


def goal(benchmark, name: str) -> None:
    benchmark.extra_info["goal_s"] = GOALS_S[name]
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed run)
        benchmark.extra_info["goal_met"] = benchmark.stats.stats.median < GOALS_S[name]


def test_synthesize(benchmark, tmp_path_factory):
    def synthesize_tiny():
        SYNTHESIZED["tiny"] = synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0, progress=False)

    benchmark.group = "tiny preset: synthesize"
    benchmark.pedantic(synthesize_tiny, rounds=ROUNDS, iterations=1)
    goal(benchmark, "synthesize")


@pytest.fixture(scope="module")
def two_subject_store(tmp_path_factory):
    data = SYNTHESIZED.get("tiny") or synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0, progress=False)
    return prepare(data, from_dict(STORE_SETTINGS, "benchmark settings"), tmp_path_factory.mktemp("stores") / "two", progress=False)


def build(store) -> GibletAutoencoder:
    dims = dims_from_manifest(store.manifest)
    model = GibletAutoencoder(dims, SMALL)
    model.set_grid(*store.mask())
    return model.attach(Stimuli.from_store(store, dims))


def test_overfit(benchmark, two_subject_store):
    batch = WindowDataset(two_subject_store, "train").batch(np.arange(32))
    steps_taken = []

    def fresh_model():
        torch.manual_seed(0)
        model = build(two_subject_store)
        loss = GibletLoss(LossConfig(), LossScales.from_store(two_subject_store, model))  # every loss at its default weight
        return (model, loss, torch.optim.Adam(model.parameters(), lr=2e-3)), {}

    def overfit(model, loss, optimizer):
        steps, first, last = steps_to_fit(model, loss, optimizer, batch, MAX_STEPS)
        steps_taken.append(steps)
        benchmark.extra_info["fmri_loss"] = [first, last]

    benchmark.group = "tiny preset, 2 subjects: overfit 32 TRs (fMRI loss / 10)"
    benchmark.pedantic(overfit, setup=fresh_model, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["steps"] = steps_taken
    benchmark.extra_info["threads"] = torch.get_num_threads()
    goal(benchmark, "overfit")


@pytest.mark.parametrize("mode", ["cross_subject", "per_subject"])
def test_read_batch(benchmark, two_subject_store, mode):
    dataset = WindowDataset(two_subject_store, "train", mode=mode)
    rng = np.random.default_rng(0)
    benchmark.group = "tiny preset, 2 subjects: read a random batch of 16 windows"
    benchmark(lambda: dataset.batch(rng.integers(0, len(dataset), 16)))
