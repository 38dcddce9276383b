"""The 13-layer autoencoder: shapes per modality combination, lesions, losses, native ops, checkpoints, overfitting."""

import dataclasses
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import giblet
from giblet.bench.train_step import steps_to_fit
from giblet.config import LossConfig, ModelConfig, from_dict
from giblet.data.dataset import WindowDataset, window_index
from giblet.models import GibletAutoencoder, ModelDims, Stimuli, dims_from_manifest
from giblet.models.checkpoint import save_checkpoint
from giblet.train.losses import GibletLoss, LossScales

# The plain network: the linear branch and the modality readouts (on by default) are off unless a test turns them on.
SMALL = ModelConfig(
    frame_features=16, modality_width=32,
    hidden=[64, 48, 64], dropout=0.0, slot_features=16,
    linear_branch=False, modality_readouts=False,
)


def build(store, dims=None, config=SMALL, device="cpu"):
    dims = dims or dims_from_manifest(store.manifest)
    model = GibletAutoencoder(dims, config)
    model.set_grid(*store.mask())
    stimuli = Stimuli.from_store(store, dims)
    return model.to(device).attach(stimuli.to(device))


def a_batch(store, n=6, split="train", device="cpu"):
    dataset = WindowDataset(store, split)
    picks = np.linspace(0, len(dataset) - 1, n).astype(int)
    return {k: v.to(device) for k, v in dataset.batch(picks).items()}


def combinations(manifest):
    codes = dims_from_manifest(manifest, "codes")
    mel = dims_from_manifest(manifest, "mel")
    yield "video+codes+text", codes
    yield "video+mel+text", mel
    yield "codes+text (no video)", codes.without("video")
    yield "video+text (no audio)", codes.without("codes")
    yield "video+codes (no text)", codes.without("text")
    yield "mel only", mel.without("video").without("text")


def test_model_inputs_leave_the_other_modalities_out(tiny_store):
    manifest = tiny_store.manifest
    everything = dims_from_manifest(manifest, "mel", ["video", "audio", "text"])
    assert everything == dims_from_manifest(manifest, "mel")
    for inputs, present in (
        (["text"], {"text"}), (["audio"], {"mel"}), (["video", "audio"], {"video", "mel"}), (["video", "text"], {"video", "text"}),
    ):
        for dims in (dims_from_manifest(manifest, "mel", inputs), everything.restricted_to(inputs)):
            assert {m for m in ("video", "codes", "mel", "text") if dims.present(m)} == present, inputs
    assert not dims_from_manifest(manifest, "codes", ["video", "text"]).present("codes")
    model = build(tiny_store, dims_from_manifest(manifest, "mel", ["text"]))
    assert model.modalities == ["text"] and not hasattr(model, "l1_video") and not hasattr(model, "l1_mel")
    out = model(a_batch(tiny_store, n=3))
    assert set(out["reconstructions"]) == {"text"} and out["brain"].shape == (3, tiny_store.n_voxels)


def test_shapes_for_each_modality_combination(tiny_store):
    batch = a_batch(tiny_store, n=5)
    for name, dims in combinations(tiny_store.manifest):
        model = build(tiny_store, dims)
        out = model(batch)
        assert out["brain"].shape == (5, dims.n_voxels), name
        recon, targets = out["reconstructions"], out["targets"]
        expected = {
            "video": (5, dims.video_slots, 3, dims.frame_height, dims.frame_width),  # the store's frames,
            "codes": (5, dims.code_slots, dims.n_codebooks, dims.codebook_size),
            "mel": (5, dims.mel_slots, dims.n_mels),
            "text": (5, dims.text_slots, dims.embedding_size),
        }
        assert set(recon) == set(model.modalities), name
        for modality, value in recon.items():
            assert value.shape == expected[modality], (name, modality)
        if "codes" in recon:
            assert targets["codes"].shape == (5, dims.code_slots, dims.n_codebooks)
        total, parts = GibletLoss()(out)
        names = {"video": "frames"}
        brain_terms = {"fmri", "fmri_correlation"} if LossConfig().fmri_correlation > 0 else {"fmri"}
        assert torch.isfinite(total) and set(parts) == brain_terms | {names.get(m, m) for m in recon}, name
        total.backward()


def test_the_sherlock_sized_model_stays_under_400m_parameters():
    dims = ModelDims(
        n_voxels=85_810, window_s=11.5, video_slots=48, frame_height=90, frame_width=160, code_slots=112, n_codebooks=8,
        codebook_size=1024, code_rate_hz=75.0, text_slots=3, embedding_size=1024,
    )
    with torch.device("meta"):
        model = GibletAutoencoder(dims, ModelConfig())
    assert model.n_parameters() < 400e6
    # One trunk per modality (model.stream_trunks): layer 7 reads each one's share of the last hidden width.
    assert model.l7_brain.weight.shape == (85_810, 3 * -(-ModelConfig().hidden[-1] // 3))


def test_layer_table_names_all_13_layers_and_counts_every_parameter(tiny_store):
    model = build(tiny_store)
    table = model.layer_table()
    numbers = {int(row[0].split()[0][1:]) for row in table}
    assert numbers == set(range(1, 14))
    assert sum(row[3] for row in table) == model.n_parameters()
    brain = next(row for row in table if row[0] == "L7 brain")
    assert brain[2] == f"1x{tiny_store.n_voxels}"


def test_a_unit_reads_each_trunk_by_its_stream_gate(tiny_store):
    model = build(tiny_store).eval()
    n = model.n_units
    first, second = np.arange(n) < n // 2, np.arange(n) >= n // 2
    # The first half of the units hear and see (audio twice the frames' weight), the second half only read.
    weights = {"video": np.where(first, 0.2, 0.0), "audio": np.where(first, 0.4, 0.0), "text": np.where(second, 0.3, 0.0)}
    model.set_stream_gate(weights)
    gate = dict(zip(model.modalities, model.stream_gate))
    torch.testing.assert_close(gate["video"][first], torch.full((n // 2,), 0.5))
    audio = next(m for m in model.modalities if m in ("codes", "mel"))  # the audio block serves either
    assert torch.all(gate[audio][first] == 1) and torch.all(gate["text"][first] == 0)
    assert torch.all(gate["text"][second] == 1) and torch.all(gate["video"][second] == 0)
    batch = a_batch(tiny_store)
    with torch.no_grad():
        before = model.encode(batch)
        model.stimuli.text.add_(0.5)  # another text in every window
        after = model.encode(batch)
    assert torch.equal(before[:, first], after[:, first]), "a unit whose text gate is 0 ignores the text"
    assert not torch.allclose(before[:, second], after[:, second])
    with pytest.raises(ValueError, match="need.*audio"):
        model.set_stream_gate({"video": np.ones(n), "text": np.ones(n)})


def test_a_lesioned_unit_outputs_zero_and_its_weights_get_no_gradient(tiny_store):
    model = build(tiny_store)
    batch = a_batch(tiny_store)
    lesioned = torch.zeros(model.n_units, dtype=torch.bool)
    lesioned[::7] = True
    model.set_lesion(lesioned)
    out = model(batch)
    assert torch.all(out["brain"][:, lesioned] == 0)
    total, _ = GibletLoss()(out)
    total.backward()
    assert torch.all(model.l7_brain.weight.grad[lesioned] == 0)
    assert torch.all(model.l7_brain.bias.grad[lesioned] == 0)
    assert model.l7_brain.weight.grad[~lesioned].abs().sum() > 0
    model.set_lesion(None)
    assert model.l7_brain.keep.all()


def test_decode_of_a_lesioned_brain_differs_only_through_those_units(tiny_store):
    model = build(tiny_store).eval()
    batch = a_batch(tiny_store)
    units = [0, 5, 11, 300]
    with torch.no_grad():
        intact = model.encode(batch)
        with model.lesion(units):
            lesioned = model.encode(batch)
        assert model.l7_brain.keep.all(), "the context manager restores the units"
        silenced = torch.zeros(model.n_units, dtype=torch.bool)
        silenced[units] = True
        assert torch.equal(lesioned[:, ~silenced], intact[:, ~silenced])
        assert torch.all(lesioned[:, silenced] == 0)
        by_hand = intact.clone()
        by_hand[:, silenced] = 0
        for modality, value in model.decode(lesioned).items():
            torch.testing.assert_close(value, model.decode(by_hand)[modality], rtol=0, atol=0)
        assert any(not torch.equal(a, b) for a, b in zip(model.decode(lesioned).values(), model.decode(intact).values()))


def test_lesion_masks_from_indices_bool_and_roi_images(tiny_store, tmp_path):
    model = build(tiny_store)
    mask, affine = tiny_store.mask()
    roi = np.zeros(mask.shape, dtype=np.uint8)
    roi[: mask.shape[0] // 2] = 1
    path = tmp_path / "roi.nii.gz"
    nib.save(nib.Nifti1Image(roi, affine), str(path))
    expected = torch.from_numpy(roi[mask] > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same grid: no resampling, no warning
        assert torch.equal(model.lesion_mask(str(path)), expected)
    assert torch.equal(model.lesion_mask(torch.nonzero(expected).flatten().tolist()), expected)
    assert torch.equal(model.lesion_mask(expected.numpy()), expected)
    # The same ROI on a grid shifted by one voxel along x: resampled by nearest neighbour, with a warning.
    shifted = np.zeros_like(roi)
    shifted[1:] = roi[:-1]
    moved = affine.copy()
    moved[:3, 3] -= affine[:3, 0]
    shifted_path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(shifted, moved), str(shifted_path))
    with pytest.warns(UserWarning, match="nearest neighbour"):
        assert torch.equal(model.lesion_mask(str(shifted_path)), expected)
    with pytest.raises(ValueError):
        model.lesion_mask([model.n_units])


def test_codes_loss_ignores_pad():
    logits = torch.randn(2, 5, 3, 16)
    codes = torch.randint(0, 16, (2, 5, 3))
    codes[0, :2] = -1
    output = {"brain": torch.zeros(2, 4), "reconstructions": {"codes": logits}, "targets": {"codes": codes}}
    loss = GibletLoss()
    before = loss(output)[1]["codes"]
    changed = logits.clone()
    changed[0, :2] = 100 * torch.randn_like(changed[0, :2])
    after = loss({**output, "reconstructions": {"codes": changed}})[1]["codes"]
    assert torch.equal(before, after)
    changed[1, 0, :, 0] += 5  # one class more likely: the cross-entropy moves
    assert not torch.equal(before, loss({**output, "reconstructions": {"codes": changed}})[1]["codes"])


def test_loss_scales_come_from_the_train_split_only(tiny_store):
    model = build(tiny_store)
    scales = LossScales.from_store(tiny_store, model)
    assert scales.frames > 0 and len(scales.codes) == tiny_store.manifest["audio"]["codes"]["n_codebooks"] and scales.text > 0
    index = window_index(tiny_store)
    start, stop = tiny_store.splits["train"]
    train_frames = set(index.video[start:stop].ravel().tolist()) - {-1}
    test_start, test_stop = tiny_store.splits["test"]
    test_only = sorted(set(index.video[test_start:test_stop].ravel().tolist()) - train_frames - {-1})
    assert test_only
    model.stimuli.frame_targets[test_only] = 255 - model.stimuli.frame_targets[test_only]
    assert LossScales.from_store(tiny_store, model).frames == scales.frames
    model.stimuli.frame_targets[sorted(train_frames)[:50]] = 255
    assert LossScales.from_store(tiny_store, model).frames != scales.frames


def _profiled_op_names(model, batch):
    with torch.profiler.profile() as profile:
        total, _ = GibletLoss()(model(batch))
        total.backward()
    return {event.name for event in profile.events()}


def test_the_model_runs_the_native_ops(tiny_store, device):
    bottleneck = {"giblet::bottleneck", "giblet::bottleneck_backward"}
    for dims, ops in (
        (dims_from_manifest(tiny_store.manifest, "codes"), {"giblet::gather_project", "giblet::resample_codes", "giblet::gather_project_backward"}),
        (dims_from_manifest(tiny_store.manifest, "mel"), {"giblet::grid_average"}),
    ):
        # One trunk per modality (the default) computes layer 7 as gated column blocks; the fused trunk, one bottleneck.
        for config, expected in ((SMALL, ops), (dataclasses.replace(SMALL, stream_trunks=False), ops | bottleneck)):
            model = build(tiny_store, dims, config=config, device=device)
            names = _profiled_op_names(model, a_batch(tiny_store, device=device))
            assert expected <= names, expected - names


def test_checkpoint_rebuilds_the_model_without_the_yaml(tiny_store, tmp_path):
    model = build(tiny_store).eval()
    model.set_lesion([1, 2, 3])
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "best.pt", step=7)
    loaded = giblet.load(tmp_path / "run").eval()
    assert loaded.dims == model.dims and loaded.config == model.config
    loaded.attach(model.stimuli)
    batch = a_batch(tiny_store)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch), model.encode(batch), rtol=0, atol=0)
    assert torch.equal(loaded.grid_mask, model.grid_mask)
    assert not loaded.l7_brain.keep[1:4].any()


def _full_disk(payload, target):
    """torch.save on a full disk: part of the file written, then its writer's error."""
    with open(target, "wb") as stream:
        stream.write(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 94084928 vs 94084816")


def test_a_full_disk_while_saving_names_the_file_and_leaves_the_previous_checkpoint(tiny_store, tmp_path, monkeypatch):
    model = build(tiny_store)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(model, path, step=1)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _full_disk)
    with pytest.raises(giblet.errors.DataError) as error:
        save_checkpoint(model, path, step=2)
    message = str(error.value)
    assert message.startswith(f"{path}: could not be written ([enforce fail") and "MiB free on its disk" in message
    assert "room for about" in message and "--resume" in message
    assert path.read_bytes() == before  # the previous checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_a_full_disk_message_counts_the_optimizer_state_and_offers_resume_only_when_a_checkpoint_exists(tiny_store, tmp_path, monkeypatch):
    import re

    model = build(tiny_store)
    optimizer = torch.optim.AdamW(model.parameters())
    model(a_batch(tiny_store))["brain"].sum().backward()
    optimizer.step()  # two moments per parameter: the file holds those as well as the weights and buffers
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    moments = sum(t.numel() * t.element_size() for state in optimizer.state_dict()["state"].values()
                  for t in state.values() if t.dim() > 0) / 2**20  # the encoder's: only it has gradients here
    assert moments > 0.5 * weights

    monkeypatch.setattr(torch, "save", _full_disk)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(giblet.errors.DataError) as error:
        save_checkpoint(model, path, optimizer=optimizer.state_dict())
    message = str(error.value)
    need = float(re.search(r"room for about ([\d,.]+) MiB", message).group(1).replace(",", ""))
    assert need == pytest.approx(weights + moments, abs=1.0), (need, weights, moments)  # the message rounds to MiB
    assert "--resume" not in message and "no checkpoint of this run" in message  # nothing to resume from yet


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": 1, "model": Exploit()}))
    with pytest.raises(giblet.errors.DataError, match="is damaged or not a giblet checkpoint"):
        giblet.load(path)


def test_a_damaged_checkpoint_is_said_to_be_damaged_and_names_the_intact_one(tiny_store, tmp_path):
    model = build(tiny_store).eval()
    save_checkpoint(model, tmp_path / "checkpoints" / "last.pt")
    best = tmp_path / "checkpoints" / "best.pt"
    best.write_bytes((tmp_path / "checkpoints" / "last.pt").read_bytes()[:5000])  # cut short, as by a full disk
    with pytest.raises(giblet.errors.DataError) as error:
        giblet.load(tmp_path)  # the best checkpoint is the one a run folder loads
    message = str(error.value)
    assert message.startswith(f"{best}: is damaged") and f"use {tmp_path / 'checkpoints' / 'last.pt'}" in message
    assert "weights_only=False" not in message  # torch's advice would run whatever the file holds
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(giblet.errors.DataError, match="never load it with weights_only=False"):
        giblet.load(best)


def test_a_checkpoint_with_the_merged_l1_widths_loads_when_they_equal_slot_features(tiny_store, tmp_path):
    model = build(tiny_store).eval()
    path = save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    slot = payload["architecture"]["model"]["slot_features"]
    payload["architecture"]["model"].update(code_features=slot, mel_features=slot, segment_features=slot, modality_dropout=0.2)
    torch.save(payload, path)
    assert giblet.load(path).n_units == model.n_units
    payload["architecture"]["model"]["mel_features"] = slot * 2
    torch.save(payload, path)
    with pytest.raises(giblet.errors.DataError, match="model.mel_features is now model.slot_features"):
        giblet.load(path)


def test_a_checkpoint_with_the_removed_settings_loads_and_a_parcel_checkpoint_is_refused(tiny_store, tmp_path):
    model = build(tiny_store).eval()
    path = save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    # Written before model.parcels and model.decoder_gradient_to_brain were removed: both keys, at their only values.
    payload["architecture"]["model"].update(parcels=None, decoder_gradient_to_brain=0.0)
    torch.save(payload, path)
    loaded = giblet.load(path)
    assert loaded.n_units == model.n_units
    assert not hasattr(loaded, "parcel_of_voxel")
    payload["architecture"]["model"]["parcels"] = "parcels.nii.gz"
    payload["model"]["parcel_of_voxel"] = torch.arange(model.n_units) % 10
    torch.save(payload, path)
    with pytest.raises(giblet.errors.DataError, match="parcel model"):
        giblet.load(path)


@pytest.fixture(scope="module")
def two_subject_store(tiny_data, tmp_path_factory):
    from giblet.data.store import prepare

    config = from_dict({"data": {"subjects": [1, 2]}, "audio": {"features": ["mel"]}, "window": {"lookback_s": 8.0, "hrf_length_s": 20.0}})
    return prepare(tiny_data, config, tmp_path_factory.mktemp("stores") / "two", progress=False)


@pytest.mark.slow  # prepares its own two-subject store, then trains up to 400 steps
def test_a_tiny_two_subject_model_overfits_32_trs(two_subject_store):
    torch.manual_seed(0)
    assert len(two_subject_store.subjects) == 2
    model = build(two_subject_store, config=ModelConfig(**{**SMALL.__dict__, "hidden": [128, 128, 128]}))
    dataset = WindowDataset(two_subject_store, "train")
    batch = dataset.batch(np.arange(32))
    loss = GibletLoss(LossConfig(), LossScales.from_store(two_subject_store, model))  # every loss at its default weight
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps, first, last = steps_to_fit(model, loss, optimizer, batch, max_steps=400)
    assert last < first / 10, f"fMRI loss {first:.3f} -> {last:.3f} in {steps} steps"


def test_losses_are_float32_under_bf16_autocast(tiny_store):
    model = build(tiny_store)
    batch = a_batch(tiny_store)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(batch)
        total, parts = GibletLoss()(output)
    assert output["reconstructions"]["video"].dtype == torch.bfloat16  # the layers ran in bf16
    assert output["brain"].dtype == torch.float32  # the native bottleneck ran in float32
    assert total.dtype == torch.float32 and all(value.dtype == torch.float32 for value in parts.values())
    total.backward()
    assert model.l7_brain.weight.grad.dtype == torch.float32


def test_the_reconstruction_gradient_never_reaches_the_brain(tiny_store):
    batch = a_batch(tiny_store)
    model = build(tiny_store).train()
    output = model(batch)
    _, parts = GibletLoss()(output)
    (parts["frames"] + parts["text"] + parts["codes"]).backward()
    encoder = list(model.l4_l6.parameters()) + list(model.l7_brain.parameters())
    assert all(p.grad is None for p in encoder), "layers 1-7 get no reconstruction gradient"
    assert model.l8_l10[0].linear.weight.grad.abs().sum() > 0, "the decoder learns to read layer 7"
    assert model.l13_video.linear.weight.grad.abs().sum() > 0
    # Layer 7 is read as it is: the detached copy the decoder sees has the same values.
    with torch.no_grad():
        decoded = model.eval().decode(output["brain"])
    for name, value in output["reconstructions"].items():
        torch.testing.assert_close(value, decoded[name])
    # The fMRI term's gradient still reaches it.
    model.zero_grad(set_to_none=True)
    GibletLoss()(model.train()(batch))[1]["fmri"].backward()
    assert model.l7_brain.weight.grad.abs().sum() > 0


def test_shared_temporal_kernels_are_a_factored_slot_by_feature_weight():
    from giblet.models.autoencoder import TemporalConcat

    torch.manual_seed(0)
    slots, features, width, kernels = 12, 5, 7, 3
    shared = TemporalConcat(slots, features, width, kernels)
    dense = TemporalConcat(slots, features, width)
    # The dense layer whose (slot, feature) weight is sum_k kernel[slot, k] * linear[:, k, feature] is the same map.
    factored = torch.einsum("sk,wkf->wsf", shared.kernels, shared.linear.weight.view(width, kernels, features))
    with torch.no_grad():
        dense.linear.weight.copy_(factored.reshape(width, slots * features))
        dense.linear.bias.copy_(shared.linear.bias)
    x = torch.randn(4, slots, features)
    torch.testing.assert_close(shared(x), dense(x), rtol=1e-5, atol=1e-5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared) == slots * kernels + kernels * features * width + width + 2 * width
    assert count(shared) < count(dense)


def test_a_model_with_shared_temporal_kernels_trains_on_the_store(tiny_store):
    config = ModelConfig(**{**SMALL.__dict__, "temporal_kernels": 2})
    model = build(tiny_store, config=config)
    assert model.l2_video.kernels.shape == (model.dims.video_slots, 2)
    batch = a_batch(tiny_store)
    total, _ = GibletLoss()(model(batch))
    total.backward()
    assert model.l2_video.kernels.grad.abs().sum() > 0 and model.l2_text.kernels.grad.abs().sum() > 0


def test_modality_readouts_supervise_each_l2_vector_in_training_only(tiny_store):
    config = ModelConfig(**{**SMALL.__dict__, "modality_readouts": True})
    model = build(tiny_store, config=config)
    batch = a_batch(tiny_store, n=4)
    out = model(batch)
    assert set(out["modality_brain"]) == set(model.modalities)
    assert all(readout.shape == (4, model.n_units) for readout in out["modality_brain"].values())
    total, parts = GibletLoss()(out)
    target = out["targets"]["fmri"].float()
    expected = torch.stack([torch.nn.functional.mse_loss(r, target) for r in out["modality_brain"].values()]).mean()
    torch.testing.assert_close(parts["fmri_per_modality"], expected)
    # That term alone trains the L1-L2 paths and the readouts, nothing past the fusion.
    parts["fmri_per_modality"].backward()
    assert model.l2_text.linear.weight.grad.abs().sum() > 0 and model.modality_readouts["text"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(model.l4_l6.parameters()) + list(model.l7_brain.parameters()))
    # Never in evaluation: predictions, lesions and the decoder read layer 7 alone.
    assert "modality_brain" not in model.eval()(batch)
    assert "fmri_per_modality" not in GibletLoss()(model(batch))[1]
    assert "modality_brain" not in build(tiny_store).train()(batch)


def test_an_inference_checkpoint_leaves_the_readouts_out_and_predicts_the_same(tiny_store, tmp_path):
    model = build(tiny_store, config=dataclasses.replace(SMALL, modality_readouts=True)).eval()
    full = save_checkpoint(model, tmp_path / "full.pt")
    lean = save_checkpoint(model, tmp_path / "lean.pt", inference_only=True)
    weights = torch.load(lean, weights_only=True)["model"]
    assert not any(key.startswith("modality_readouts.") for key in weights)
    assert set(weights) | {k for k in model.state_dict() if k.startswith("modality_readouts.")} == set(model.state_dict())
    assert lean.stat().st_size < full.stat().st_size
    loaded = giblet.load(lean).eval().attach(model.stimuli)
    assert loaded.modality_readouts is None and giblet.load(full).modality_readouts is not None
    batch = a_batch(tiny_store)
    with torch.no_grad():
        brain = model.encode(batch)
        torch.testing.assert_close(loaded.encode(batch), brain, rtol=0, atol=0)
        for name, value in model.decode(brain).items():
            torch.testing.assert_close(loaded.decode(brain)[name], value, rtol=0, atol=0)


def test_a_checkpoint_from_before_stream_trunks_loads_as_the_fused_trunk_it_was(tiny_store, tmp_path):
    model = build(tiny_store, config=dataclasses.replace(SMALL, stream_trunks=False)).eval()
    path = save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["architecture"]["model"]["stream_trunks"]  # written before the setting existed
    torch.save(payload, path)
    loaded = giblet.load(path).eval().attach(model.stimuli)
    assert loaded.config.stream_trunks is False
    batch = a_batch(tiny_store)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch), model.encode(batch), rtol=0, atol=0)


def test_a_checkpoint_that_named_its_decoded_frame_size_loads_when_it_is_the_store_s(tiny_store, tmp_path):
    model = build(tiny_store).eval()
    height, width = model.dims.frame_height, model.dims.frame_width
    assert model.decode(model.encode(a_batch(tiny_store)))["video"].shape[-2:] == (height, width)
    path = save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["model"].update(decoded_frame_height=height, decoded_frame_width=width)  # as older files did
    torch.save(payload, path)
    batch = a_batch(tiny_store)
    with torch.no_grad():
        torch.testing.assert_close(giblet.load(path).eval().attach(model.stimuli).decode(model.encode(batch))["video"],
                                   model.decode(model.encode(batch))["video"], rtol=0, atol=0)
    # A model that decoded smaller frames than its store's cannot be rebuilt: the error says what to do.
    payload["architecture"]["model"].update(decoded_frame_height=9, decoded_frame_width=16)
    torch.save(payload, path)
    with pytest.raises(giblet.errors.DataError, match=r"decoding 16x9 frames from a store of 32x18(.|\n)*retrain"):
        giblet.load(path)


def test_mel_input_is_standardized_with_training_statistics_saved_in_the_checkpoint(tiny_store, tmp_path):
    dims = dims_from_manifest(tiny_store.manifest, "mel")
    model = build(tiny_store, dims).eval()
    scales = LossScales.from_store(tiny_store, model)
    assert min(scales.mel_mean) < -10, "log-mel decibels are far from 0: the reason for standardizing"
    model.set_input_statistics(scales.mel_mean, scales.mel_std)
    batch = a_batch(tiny_store)
    mel = model._windows(batch)["mel"]
    expected = torch.nn.functional.gelu(model.l1_mel.linear((mel - torch.tensor(scales.mel_mean)) / torch.tensor(scales.mel_std)))
    torch.testing.assert_close(model.l1_mel(mel), expected)
    standardized = (mel - model.l1_mel.mean) / model.l1_mel.std
    assert abs(float(standardized.mean())) < 0.5 and 0.5 < float(standardized.std()) < 2.0
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "best.pt", step=1)
    loaded = giblet.load(tmp_path / "run").eval().attach(model.stimuli)
    assert torch.equal(loaded.l1_mel.mean, model.l1_mel.mean) and torch.equal(loaded.l1_mel.std, model.l1_mel.std)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch), model.encode(batch), rtol=0, atol=0)
    # A checkpoint written before the statistics existed loads with the identity (raw mel, as it was trained).
    payload = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    del payload["model"]["l1_mel.mean"], payload["model"]["l1_mel.std"]
    torch.save(payload, tmp_path / "old.pt")
    old = giblet.load(tmp_path / "old.pt")
    assert torch.equal(old.l1_mel.mean, torch.zeros_like(model.l1_mel.mean)) and torch.equal(old.l1_mel.std, torch.ones_like(model.l1_mel.std))
    # Anything else missing is still an error.
    del payload["model"]["l7_brain.bias"]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(giblet.errors.DataError, match="l7_brain.bias"):
        giblet.load(tmp_path / "broken.pt")


def test_the_linear_branch_adds_the_banded_ridge_to_layer_7_is_lesioned_with_it_and_is_saved(tiny_store, tmp_path):

    from giblet.linear import banded_linear_map, hrf_regressors, regressor_parts

    config = dataclasses.replace(SMALL, linear_branch=True)
    dims = dims_from_manifest(tiny_store.manifest, "mel")
    model = GibletAutoencoder(dims, config)
    model.set_grid(*tiny_store.mask())
    assert torch.count_nonzero(model.l7_brain.weight) == 0  # the network starts silent
    stimuli = Stimuli.from_store(tiny_store, dims, hrf="glover")
    parts = regressor_parts(tiny_store, stimuli.frame_targets)
    assert set(parts) == {"video", "audio", "text"}
    weight, bias = banded_linear_map(tiny_store, parts, "glover", n_iter=5)
    assert stimuli.regressors.shape == (tiny_store.n_trs, weight.shape[0])
    model.set_linear_branch(weight, bias)
    model.attach(stimuli).eval()
    batch = a_batch(tiny_store, n=5, split="test")
    expected = hrf_regressors(tiny_store, parts, "glover")[batch["tr"].numpy()] @ weight + bias
    with torch.no_grad():
        brain = model.encode(batch)
        torch.testing.assert_close(brain, torch.from_numpy(expected) + model.l7_brain.bias, rtol=1e-4, atol=1e-4)
        with model.lesion([0, 3]):
            lesioned = model.encode(batch)
    assert torch.all(lesioned[:, [0, 3]] == 0) and torch.equal(lesioned[:, 1], brain[:, 1])
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "best.pt")
    loaded = giblet.load(tmp_path / "run").eval().attach(stimuli)
    assert torch.equal(loaded.linear_weight, model.linear_weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch), brain)
    # Without the regressors the branch cannot run: the error says what to attach.
    loaded.attach(Stimuli.from_store(tiny_store, dims))
    with pytest.raises(RuntimeError, match="hrf=<the run's alignment.hrf>"):
        loaded.encode(batch)
    with pytest.raises(ValueError, match="expected"):
        model.set_linear_branch(weight[:, :5], bias)


def test_the_decoders_targets_are_the_frame_table_itself_on_any_device(tiny_store, device):
    """The decoder's targets are the store's frames channel-first, a view of the frame table the encoder reads:
    moving the tables to the training device holds the frames there once, not twice."""
    stimuli = Stimuli.from_store(tiny_store, dims_from_manifest(tiny_store.manifest)).to(device)
    targets = stimuli.frame_targets
    assert targets.device.type == torch.device(device).type
    assert targets.untyped_storage().data_ptr() == stimuli.frames.untyped_storage().data_ptr()
    np.testing.assert_array_equal(targets.permute(0, 2, 3, 1).cpu().numpy(), np.asarray(tiny_store.frames()))
    stimuli.frames[0] = 0  # a write through either is seen through the other: one table
    assert int(stimuli.frame_targets[0].max()) == 0
