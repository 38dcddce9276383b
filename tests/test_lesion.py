"""Lesions: on a model wired by hand (audio read from the auditory units, video from the visual ones), silencing a
region costs its modality alone, more than any random units; the report's files; ROI reading and errors."""

import json
import math

import av
import librosa
import nibabel as nib
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from giblet.config import ModelConfig
from giblet.data.audio import mel_spectrogram
from giblet.data.dataset import WindowDataset
from giblet.eval import lesion as lesion_mod
from giblet.eval.runs import load_run
from giblet.models import GibletAutoencoder, dims_from_manifest
from giblet.models.checkpoint import save_checkpoint
from giblet_cli.main import app

runner = CliRunner()

SMALL_MODEL = {"frame_features": 16, "modality_width": 32, "hidden": [32, 32],
               "slot_features": 8, "audio_input": "mel", "linear_branch": False}


@pytest.fixture(scope="module")
def untrained_run(tiny_store, tmp_path_factory):
    """A run folder holding an untrained small model of the tiny store: enough for the errors and the parts."""
    run = tmp_path_factory.mktemp("lesion") / "untrained"
    model = GibletAutoencoder(dims_from_manifest(tiny_store.manifest, "mel"), ModelConfig(**SMALL_MODEL))
    model.set_grid(*tiny_store.mask())
    save_checkpoint(model, run / "checkpoints" / "best.pt", store_key=tiny_store.key)
    return run


def _roi(path, store, values=None, shape=None, affine=None):
    mask, store_affine = store.mask()
    if values is None:
        values = np.zeros(shape or mask.shape, dtype=np.uint8)
    nib.save(nib.Nifti1Image(values.astype(np.uint8), store_affine if affine is None else affine), str(path))
    return path


def _first_voxels(store, count):
    mask, _ = store.mask()
    values = np.zeros(mask.shape, dtype=np.uint8)
    values[tuple(np.argwhere(mask)[:count].T)] = 1
    return values


def _lesion(run, roi, store, *extra):
    return runner.invoke(app, ["lesion", str(run), "--roi", str(roi), "--store", str(store.path), *extra])


# --------------------------------------------------------------------------- what a lesion shows


# A model whose answer is known, with no training: layer 7 is a constant 1 on every unit (zero weights, bias 1), and the
# decoder is wired by hand so that the audio (mel) output reads only the mean of region A's units, the video output
# only the mean of region B's and the text output nothing. Silencing all of A moves every decoded mel value by
# AUDIO_SHIFT standard deviations and leaves the video and text outputs alone; a random set of units moves the mel
# output by AUDIO_SHIFT times the share of A it hits. Layer 8's LayerNorm normalises all of its features together, so
# two features of +-BIG (and every feature paired with its negative, so the mean stays 0) dominate its statistics:
# A's and B's features then reach the output independently, up to float32 rounding.
BIG = 1e4
AUDIO_SHIFT = 5.0  # standard deviations of each standardized mel band
VIDEO_SHIFT = 6.0  # logits: a decoded pixel goes from 0.5 to about 0 or 1
WIRED_MODEL = {**SMALL_MODEL, "hidden": [6], "modality_width": 4, "slot_features": 2, "dropout": 0.0,
               "linear_branch": False, "modality_readouts": False}
PERMUTATIONS = 39  # the smallest possible p is 1 / 40


def wired_model(store, region_a: np.ndarray, region_b: np.ndarray, video_sign: float = 1.0,
                audio_sign: float = 1.0) -> GibletAutoencoder:
    """The model above: mel reads the units of ``region_a`` (bool, mask order), video those of ``region_b``; the signs
    say which way silencing moves each output."""
    model = GibletAutoencoder(dims_from_manifest(store.manifest, "mel"), ModelConfig(**WIRED_MODEL))
    assert model.modalities == ["video", "mel", "text"]
    a, b = torch.from_numpy(region_a), torch.from_numpy(region_b)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.l7_brain.bias.fill_(1.0)  # layer 7 = 1 on every unit, whatever the stimulus
        block = model.l8_l10[0]
        block.linear.bias.copy_(torch.tensor([BIG, -BIG, 0, 0, 0, 0]))
        block.linear.weight[2, a], block.linear.weight[3, a] = 1 / int(a.sum()), -1 / int(a.sum())  # +-mean of A
        block.linear.weight[4, b], block.linear.weight[5, b] = 1 / int(b.sum()), -1 / int(b.sum())  # +-mean of B
        scale = BIG / math.sqrt(3)  # the LayerNorm's deviation: sqrt(2 BIG^2 / 6), up to the small features
        block.norm.weight.copy_(torch.tensor([0, 0, scale, 0, scale, 0]))
        block.norm.bias.copy_(torch.tensor([0, 0, 4.0, 0, 4.0, 0]))  # GELU is the identity within 1e-4 above 4
        # Layer 8's output: feature 2 = 4 + mean(A), feature 4 = 4 + mean(B). The split: video reads B, mel reads A.
        width = model.config.modality_width
        model.l11_split.weight[0 * width, 4] = 1.0
        model.l11_split.weight[1 * width, 2] = 1.0
        for modality, shift in (("video", video_sign * VIDEO_SHIFT), ("mel", audio_sign * AUDIO_SHIFT)):
            slots = getattr(model, f"l12_{modality}")
            slots.linear.weight.view(slots.slots, slots.features, width)[:, 0, 0] = -1.0
            slots.linear.bias.view(slots.slots, slots.features)[:, 0] = 9.0  # 5 - mean: 4 intact, 5 silenced
            head = getattr(model, f"l13_{modality}").linear
            head.weight[:, 0] = shift
            head.bias.fill_(-4.0 * shift)  # 0 intact (mel: the band mean; video: sigmoid 0.5), the shift silenced
        model.l13_text.linear.bias.fill_(1.0)  # a constant, non-zero embedding
    model.set_grid(*store.mask())
    return model


@pytest.fixture(scope="module")
def regions(tiny_data, tiny_store):
    """(auditory ROI path, visual ROI path, bool auditory units, bool visual units) of the tiny truth."""
    from giblet.data.volume import load_roi

    paths = tiny_data / "_truth" / "region_auditory.nii.gz", tiny_data / "_truth" / "region_visual.nii.gz"
    auditory, visual = (load_roi(path, tiny_store) for path in paths)
    assert auditory.any() and visual.any() and not (auditory & visual).any()
    return (*paths, auditory, visual)


@pytest.fixture(scope="module")
def wired_run(regions, tiny_store, tmp_path_factory):
    """A run folder with the wired model: audio from the auditory units, video from the visual units."""
    from giblet.models import Stimuli

    _, _, auditory, visual = regions
    # Each silenced output moves away from the mean of the held-out targets the lesion is scored on (not the whole
    # movie's): pixels towards whichever of 0 and 1 is further, mel bands up or down; the loss then only rises with
    # the share of the region silenced.
    model = wired_model(tiny_store, auditory, visual)
    model.attach(Stimuli.from_store(tiny_store, model.dims)).eval()
    scales = lesion_mod.LossScales.from_store(tiny_store, model)
    targets = [t for _, _, t in lesion_mod._encode(model, WindowDataset(tiny_store, "test", "cross_subject"))]
    frames = torch.cat([t["video"][t["video_valid"]] for t in targets])
    mel = (torch.cat([t["mel"] for t in targets]) - torch.tensor(scales.mel_mean)) / torch.tensor(scales.mel_std)
    model = wired_model(tiny_store, auditory, visual, video_sign=-1.0 if float(frames.mean()) > 0.5 else 1.0,
                        audio_sign=-1.0 if float(mel.mean()) > 0 else 1.0)
    run = tmp_path_factory.mktemp("lesion_wired") / "run"
    save_checkpoint(model, run / "checkpoints" / "best.pt", store_key=tiny_store.key)
    return run


@pytest.fixture(scope="module")
def auditory_lesion(wired_run, regions, tiny_store):
    """`giblet lesion` of the wired run with the truth's auditory regions as the ROI, over an older report."""
    out = wired_run / "lesion" / "region_auditory"
    out.mkdir(parents=True)
    (out / "lesion.json").write_text("{}")
    (out / "stale.txt").write_text("from an older report")
    result = _lesion(wired_run, regions[0], tiny_store, "--permutations", str(PERMUTATIONS))
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "lesion.json").read_text())


@pytest.fixture(scope="module")
def visual_lesion(wired_run, regions, tiny_store):
    result = _lesion(wired_run, regions[1], tiny_store, "--permutations", str(PERMUTATIONS))
    assert result.exit_code == 0, result.output
    return json.loads((wired_run / "lesion" / "region_visual" / "lesion.json").read_text())


def test_silencing_the_region_the_audio_is_read_from_costs_the_audio_only_and_more_than_any_random_units(
        auditory_lesion, regions, tiny_data):
    _, _, report = auditory_lesion
    kinds = np.load(tiny_data / "_truth" / "tuning.npz")["region_kind"]
    assert report["roi_voxels"] == report["lesioned_units"] == int(regions[2].sum()) == int((kinds == "auditory").sum())
    audio, video, text = (report["modalities"][name] for name in ("audio", "video", "text"))
    assert report["audio_feature"] == "mel"
    # Every mel value moves by AUDIO_SHIFT deviations: the loss (about 1 intact) rises by about AUDIO_SHIFT^2.
    assert audio["relative_change"] > AUDIO_SHIFT**2 / 4 / audio["loss_intact"], audio
    assert abs(video["relative_change"]) < 1e-5 and text["relative_change"] == 0, report["modalities"]
    # No random set of as many units hits all of A: each moves the mel output less.
    assert audio["p_value"] == 1 / (1 + PERMUTATIONS), (audio, sorted(report["null_relative_change"]["audio"])[-5:])
    assert max(report["null_relative_change"]["audio"]) < audio["relative_change"]
    # Random units hit B's video units; the ROI does not: nothing it changes in the video is beyond chance.
    assert video["p_value"] > 0.5 and text["p_value"] == 1.0


def test_silencing_the_region_the_video_is_read_from_costs_the_video_only(visual_lesion, regions):
    report = visual_lesion
    assert report["lesioned_units"] == int(regions[3].sum())
    audio, video, text = (report["modalities"][name] for name in ("audio", "video", "text"))
    assert video["relative_change"] > 0.1 and video["p_value"] == 1 / (1 + PERMUTATIONS), video
    assert abs(audio["relative_change"]) < 1e-5 and text["relative_change"] == 0, report["modalities"]
    assert audio["p_value"] > 0.5


def test_units_outside_both_regions_change_nothing(wired_run, regions, tiny_store):
    model, store, _ = load_run(wired_run, tiny_store.path)
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    encoded = lesion_mod._encode(model, WindowDataset(store, "test", "cross_subject"))
    intact = lesion_mod.modality_losses(model, loss, encoded)
    elsewhere = torch.from_numpy(~(regions[2] | regions[3]))
    assert lesion_mod.modality_losses(model, loss, encoded, elsewhere) == intact
    # And the wiring is what the claim rests on: half of A moves the audio less than all of A.
    half = torch.from_numpy(regions[2].copy())
    half[torch.nonzero(half).flatten()[::2]] = False
    partial = lesion_mod.modality_losses(model, loss, encoded, half)["audio"]
    assert intact["audio"] < partial < lesion_mod.modality_losses(model, loss, encoded, torch.from_numpy(regions[2]))["audio"]


# --------------------------------------------------------------------------- the report


def test_the_report_holds_losses_p_values_frames_audio_and_nearest_texts(auditory_lesion, tiny_store):
    out, output, report = auditory_lesion
    assert not (out / "stale.txt").exists(), "the older report is replaced as a whole"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    output = output.replace("\n", "")
    assert str(out) in output and "lesion.json" in output
    assert report["permutations"] == PERMUTATIONS and report["split"] == "test"
    assert set(report["modalities"]) == {"video", "audio", "text"}
    for name, entry in report["modalities"].items():
        assert set(entry) == {"loss_intact", "loss_lesioned", "relative_change", "p_value", "relative_shift", "shift_p_value"}, name
        assert entry["loss_intact"] > 0 and math.isfinite(entry["loss_lesioned"])
        assert entry["relative_change"] == pytest.approx((entry["loss_lesioned"] - entry["loss_intact"]) / entry["loss_intact"])
        null = report["null_relative_change"][name]
        assert len(null) == PERMUTATIONS
        assert entry["p_value"] == pytest.approx((1 + sum(v >= entry["relative_change"] for v in null)) / (1 + PERMUTATIONS))
        null_shift = report["null_relative_shift"][name]
        assert len(null_shift) == PERMUTATIONS and entry["relative_shift"] >= 0 and min(null_shift) >= 0
        assert entry["shift_p_value"] == pytest.approx((1 + sum(v >= entry["relative_shift"] for v in null_shift)) / (1 + PERMUTATIONS))
        assert f"{entry['relative_change']:+.2%}" in output, name

    start, stop = tiny_store.splits["test"]
    with av.open(str(out / "frames.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == stop - start  # one per test TR
    height, width = frames[0].shape[:2]
    assert height == 18 * lesion_mod.VIDEO_SCALE and width >= 3 * 32 * lesion_mod.VIDEO_SCALE  # original | intact | lesioned

    window_s = tiny_store.manifest["window"]["window_s"]
    span_s = (stop - 1 - start) * tiny_store.tr_s + window_s  # from the first window's start to the last one's end
    for name in ("intact", "lesioned", "original"):
        path = out / f"audio_{name}.wav"
        samples, wav_rate = soundfile.read(str(path), dtype="int16")
        assert wav_rate == report["files"]["audio"]["sample_rate"] and samples.ndim == 1  # mono
        assert soundfile.info(str(path)).subtype == "PCM_16"
        assert samples.size / wav_rate == pytest.approx(span_s, abs=0.1)
        assert np.abs(samples).max() > 1000, f"audio_{name}.wav is silent"

    texts = json.loads((out / "nearest_text.json").read_text())
    annotations = tiny_store.texts()
    assert [w["tr"] for w in texts["windows"]] == list(range(start, stop))
    slots = [slot for w in texts["windows"] for slot in w["slots"]]
    assert slots and all(slot["intact"]["text"] in annotations and slot["lesioned"]["text"] in annotations for slot in slots)
    assert all(slot["text"] == annotations[slot["segment"]] for slot in slots)
    assert (out / "nearest_text.txt").read_text().count("TR ") == stop - start


@pytest.fixture(scope="module")
def untrained_model(untrained_run, tiny_store):
    """The untrained model, its store and the first batch of test windows encoded."""
    model, store, _ = load_run(untrained_run, tiny_store.path)
    dataset = WindowDataset(store, "test", "cross_subject")
    encoded = lesion_mod._encode(model, dataset)[:1]
    return model, store, encoded


def test_random_parcels_are_seeded(untrained_model):
    model, store, encoded = untrained_model
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    intact = lesion_mod.modality_losses(model, loss, encoded)
    mask = store.mask()[0]
    first = lesion_mod.contiguous_null(model, loss, encoded, intact, mask, 100, 3, seed=5, progress=False)
    again = lesion_mod.contiguous_null(model, loss, encoded, intact, mask, 100, 3, seed=5, progress=False)
    other = lesion_mod.contiguous_null(model, loss, encoded, intact, mask, 100, 3, seed=6, progress=False)
    assert first == again and first != other  # (relative changes, relative shifts), each per modality
    assert len(set(first[0]["video"])) == 3 and len(set(first[1]["video"])) == 3  # three different random parcels


@pytest.mark.parametrize("move", [1e-5, 1e-3, 0.3])
def test_a_small_shift_is_measured_not_rounded(move):
    """A parcel moves the text and code reconstructions by little: the shift is second order in the move, far
    below the float32 rounding of 1 - cos or of a KL summed from log-probabilities. It must match the exact
    distance (float64) at every size of move."""
    generator = torch.Generator().manual_seed(0)
    text, codes = torch.randn(4, 3, 384, generator=generator), 3 * torch.randn(4, 3, 8, 1024, generator=generator)
    moved = {"text": text + move * torch.randn(text.shape, generator=generator),
             "codes": codes + move * torch.randn(codes.shape, generator=generator)}
    targets = {"text_valid": torch.ones(4, 3, dtype=torch.bool), "codes": torch.zeros(4, 3, 8, dtype=torch.long)}
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales(codes=[1.0] * 8))
    shift = loss.shift(moved, {"text": text, "codes": codes}, targets)
    exact_text = (1 - F.cosine_similarity(moved["text"].double(), text.double(), dim=-1)).mean()
    log_p, log_q = F.log_softmax(codes.double(), dim=-1), F.log_softmax(moved["codes"].double(), dim=-1)
    exact_codes = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    assert float(shift["text"]) == pytest.approx(float(exact_text), rel=1e-3)
    assert float(shift["codes"]) == pytest.approx(float(exact_codes), rel=1e-3)


@torch.no_grad()
def test_a_parcel_the_decoder_does_not_read_changes_nothing_exactly(untrained_model):
    """Units with decoder gain 0 (voxels not predicted beyond chance) are not read: silencing only such units
    gives the intact losses and a shift of exactly 0, not the rounding of another batch shape."""
    model, store, encoded = untrained_model
    gain = model.decoder_gain.clone()
    try:
        model.decoder_gain[: model.n_units // 2] = 0
        silenced = torch.zeros(3, model.n_units, dtype=torch.bool)
        silenced[0, :10] = True  # unread units only
        silenced[1, model.n_units // 2 : model.n_units // 2 + 10] = True  # read units
        silenced[2, model.n_units // 2 - 5 : model.n_units // 2 + 5] = True  # both
        loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
        decoded = []  # the sets that go through the decoder: the unread one must not (exact, whatever the rounding)
        silenced_decoder = model.silenced_decoder
        model.silenced_decoder = lambda brain: (lambda sets: decoded.extend(sets.tolist()) or silenced_decoder(brain)(sets))
        effects = lesion_mod.lesion_effects(model, loss, encoded, silenced, progress=False)
        assert silenced[0].tolist() not in decoded and silenced[1].tolist() in decoded and silenced[2].tolist() in decoded
        for name in effects.intact:
            assert effects.shifts[name][0] == 0 and effects.losses[name][0] == effects.intact[name]
            assert effects.shifts[name][1] > 0 and effects.shifts[name][2] > 0
    finally:
        model.decoder_gain.copy_(gain)
        vars(model).pop("silenced_decoder", None)


def test_many_lesions_in_one_pass_equal_each_decoded_alone(untrained_model):
    model, store, encoded = untrained_model
    batch, brain, targets = encoded[0]
    generator = torch.Generator().manual_seed(0)
    silenced = torch.rand(5, model.n_units, generator=generator) < torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0])[:, None]
    together = model.decode_silenced(brain, silenced)
    n = brain.shape[0]
    for k in range(5):
        alone = model.decode(brain * ~silenced[k])
        for name, value in alone.items():
            torch.testing.assert_close(together[name][k * n : (k + 1) * n], value, rtol=1e-4, atol=1e-5, msg=f"{name}, set {k}")
    # And the losses of a sweep are the losses of each lesion scored on its own.
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    swept = lesion_mod.lesion_losses(model, loss, encoded, silenced, progress=False)
    for k in range(5):
        alone = lesion_mod.modality_losses(model, loss, encoded, silenced[k])
        for name in alone:
            assert swept[name][k] == pytest.approx(alone[name], rel=1e-4, abs=1e-6), (name, k)


@torch.no_grad()
def test_a_lesions_shift_is_how_far_it_moves_the_reconstruction_and_the_rest_of_its_loss_change(untrained_model):
    model, store, encoded = untrained_model
    _, brain, targets = encoded[0]
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    intact = model.decode(brain)
    # Nothing moved, or all but nothing: 0 up to rounding, and never below (rounding alone takes a cosine above 1
    # and a KL divergence of equal distributions below 0).
    generator = torch.Generator().manual_seed(0)
    nudged = {k: v + 1e-7 * torch.randn(v.shape, generator=generator) for k, v in intact.items()}
    for moved in (intact, nudged):
        assert all(0 <= float(v) < 1e-6 for v in loss.shift(moved, intact, targets).values())
    silenced = torch.zeros(model.n_units, dtype=torch.bool)
    silenced[: model.n_units // 3] = True
    moved = model.decode(brain * ~silenced)
    shift = loss.shift(moved, intact, targets)
    assert set(shift) == {lesion_mod.LOSS_TERMS[m] for m in model.modalities} and all(float(v) > 0 for v in shift.values())
    # For the MSE terms the loss change is the shift plus twice the move's product with the intact error.
    _, before = loss({"brain": brain, "reconstructions": intact, "targets": targets})
    _, after = loss({"brain": brain, "reconstructions": moved, "targets": targets})
    mean, std = torch.tensor(loss.scales.mel_mean), torch.tensor(loss.scales.mel_std)
    error = intact["mel"] - (targets["mel"] - mean) / std
    cross = 2 * ((moved["mel"] - intact["mel"]) * error).mean()
    assert float(after["mel"] - before["mel"]) == pytest.approx(float(shift["mel"] + cross), rel=1e-4, abs=1e-7)
    # The sweep's shifts are these, window-weighted over the batches.
    effects = lesion_mod.lesion_effects(model, loss, encoded, silenced[None], progress=False)
    swept = effects.shifts
    # The intact loss it measures the shifts against is modality_losses' own.
    assert effects.intact == pytest.approx(lesion_mod.modality_losses(model, loss, encoded), rel=1e-6)
    assert swept["video"][0] == pytest.approx(float(shift["frames"]), rel=1e-4)
    audio = sum(float(shift[term]) for term in ("mel", "codes") if term in shift)
    assert swept["audio"][0] == pytest.approx(audio, rel=1e-4)


def test_the_decoder_reads_each_unit_times_its_gain(untrained_model):
    model, _, encoded = untrained_model
    _, brain, _ = encoded[0]
    saved = model.decoder_gain.clone()
    try:
        # Half the voxels noise (chance r, spread 0.1 about 0), half predicted at r 0.3-0.9.
        rng = np.random.default_rng(0)
        signal = np.arange(model.n_units) % 2 == 0
        values = np.where(signal, rng.uniform(0.3, 0.9, model.n_units), rng.normal(0.0, 0.1, model.n_units))
        reliability = torch.as_tensor(values, dtype=torch.float32)
        model.set_decoder_gain(values)
        spread = float(np.sqrt(np.mean(values[values < 0] ** 2)))
        assert spread == pytest.approx(0.1, abs=0.05)  # chance's spread, read from the negative r's
        # Read as r where r passes two spreads of chance, else not at all: every signal voxel, almost no noise voxel.
        torch.testing.assert_close(model.decoder_gain, torch.where(reliability > 2 * spread, reliability, 0.0))
        assert bool((model.decoder_gain[signal] > 0).all()) and float((model.decoder_gain[~signal] > 0).float().mean()) < 0.1
        zeroed = model.decoder_gain == 0
        noise = brain.clone()
        noise[:, zeroed] = torch.randn_like(noise[:, zeroed]) * 10
        for name, value in model.decode(noise).items():  # units of gain 0 are not read at all
            torch.testing.assert_close(value, model.decode(brain)[name], msg=name)
        silenced = torch.rand(3, model.n_units, generator=torch.Generator().manual_seed(1)) < 0.2
        together = model.decode_silenced(brain, silenced)
        n = brain.shape[0]
        for k in range(3):
            for name, value in model.decode(brain * ~silenced[k]).items():
                torch.testing.assert_close(together[name][k * n : (k + 1) * n], value, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="one value per unit"):
            model.set_decoder_gain(np.ones(model.n_units + 1))
    finally:
        model.decoder_gain.copy_(saved)


# --------------------------------------------------------------------------- errors


def test_an_roi_on_another_grid_is_resampled_onto_the_stores_with_a_warning(untrained_run, tiny_store, tmp_path):
    from giblet.data.volume import GridWarning

    mask, affine = tiny_store.mask()
    values = _first_voxels(tiny_store, 10)
    same = lesion_mod.roi_voxels(_roi(tmp_path / "same.nii.gz", tiny_store, values), tiny_store)
    # The same ROI one voxel further along x, on a grid moved by one voxel: the same voxels.
    shifted = np.zeros_like(values)
    shifted[1:] = values[:-1]
    moved = affine.copy()
    moved[:3, 3] -= affine[:3, 0]
    with pytest.warns(GridWarning, match="nearest neighbour") as caught:
        inside, outside = lesion_mod.roi_voxels(_roi(tmp_path / "moved.nii.gz", tiny_store, shifted, affine=moved), tiny_store)
    assert "moved.nii.gz" in str(caught[0].message) and str(mask.shape) in str(caught[0].message)
    np.testing.assert_array_equal(inside, same[0])
    assert inside.sum() == 10 and outside == same[1] == 0
    # A small grid that covers no mask voxel once resampled: an error naming the file, before the model is loaded.
    small_affine = affine.copy()
    small_affine[:3, 3] -= 1000 * affine[:3, 0]  # far away from the brain
    small = _roi(tmp_path / "small_grid.nii.gz", tiny_store, np.ones((10, 10, 10), dtype=np.uint8), affine=small_affine)
    with pytest.warns(GridWarning):
        result = _lesion(untrained_run, small, tiny_store)
    assert result.exit_code == 2
    message = result.output.replace("\n", "")
    assert "small_grid.nii.gz" in message and "no voxel inside" in message
    assert not (untrained_run / "lesion" / "small_grid").exists()


def test_an_roi_with_no_voxel_in_the_mask_is_an_error(untrained_run, tiny_store, tmp_path):
    mask, _ = tiny_store.mask()
    outside = _roi(tmp_path / "outside.nii.gz", tiny_store, (~mask).astype(np.uint8))
    result = _lesion(untrained_run, outside, tiny_store)
    assert result.exit_code == 2
    message = result.output.replace("\n", "")
    assert "outside.nii.gz" in message and "no voxel inside" in message and f"{int((~mask).sum())} voxels > 0" in message
    empty = _roi(tmp_path / "empty.nii.gz", tiny_store)
    assert _lesion(untrained_run, empty, tiny_store).exit_code == 2


def test_an_output_folder_that_is_not_a_lesion_report_is_left_alone(untrained_run, tiny_store, tmp_path):
    roi = _roi(tmp_path / "roi.nii.gz", tiny_store, _first_voxels(tiny_store, 10))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = _lesion(untrained_run, roi, tiny_store, "--out", str(tmp_path / "mine"))
    assert result.exit_code == 2 and "not a lesion report" in result.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- the parts


def test_zeroing_layer_7_is_the_models_lesion(untrained_model):
    model, _, encoded = untrained_model
    batch = encoded[0][0]
    units = torch.zeros(model.n_units, dtype=torch.bool)
    units[torch.randperm(model.n_units)[:500]] = True
    with torch.no_grad():
        brain = model.encode(batch)
        with model.lesion(units):
            lesioned = model.encode(batch)
            decoded = model.decode(lesioned)
        zeroed = model.decode(brain * (~units).float())
    assert torch.equal(lesioned, brain * (~units).float())
    for name in decoded:
        torch.testing.assert_close(zeroed[name], decoded[name])


def test_overlapping_windows_are_merged_on_one_clock():
    # Two windows of two 1 s slots, starting at 0 s and 1 s: the second second is covered by both.
    merged = lesion_mod.SlotAverage(np.array([0.5, 1.5, 2.5, 3.5]), slot_s=1.0, n_slots=2)
    merged.add(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([[[1.0], [2.0]], [[4.0], [8.0]]]))
    values = merged.mean()[:, 0].tolist()
    assert values == [1.0, 3.0, 8.0, 0.0]  # 0 where no window reaches
    assert merged.counts.tolist() == [1, 2, 1, 0]


def test_overlapping_code_windows_vote_by_summed_probability():
    # Three windows of one 1 s slot over the same moment: code 2 twice at 0.4, code 1 once at 0.7.
    vote = lesion_mod.SlotVote(np.array([0.5, 5.0]), slot_s=1.0, n_slots=1, max_windows=3)
    for code, probability in ((2, 0.4), (1, 0.7), (2, 0.4)):
        p = torch.full((4,), (1 - probability) / 3)
        p[code] = probability
        vote.add(torch.tensor([0.0], dtype=torch.float64), p.log().view(1, 1, 1, 4))
    assert vote.codes().tolist() == [[2, 0]]  # 0.8 beats 0.7; nothing reaches 5 s


def test_p_value_counts_random_changes_at_least_as_large():
    assert lesion_mod.p_value(0.5, [0.1, 0.6, 0.5]) == 3 / 4
    assert lesion_mod.p_value(0.9, [0.1] * 39) == 1 / 40


def test_mel_to_sound_turns_a_mel_back_into_the_sound():
    rate = 44100
    t = np.arange(2 * rate) / rate
    tone = np.where(t < 1, np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1760 * t)).astype(np.float32) * 0.5
    mel, _ = mel_spectrogram(tone, rate, n_mels=64, frame_rate_hz=50.0)
    sound, sound_rate = lesion_mod.mel_to_sound(mel, rate, hop=882)
    assert sound_rate == rate // 2 and sound.size / sound_rate == pytest.approx(2.0, abs=0.05)
    again, _ = mel_spectrogram(sound.astype(np.float32), sound_rate, n_mels=32, frame_rate_hz=50.0)
    heard, _ = mel_spectrogram(librosa.resample(tone, orig_sr=rate, target_sr=sound_rate), sound_rate, n_mels=32, frame_rate_hz=50.0)
    n = min(len(heard), len(again))
    inner = slice(5, n - 5)
    assert np.corrcoef(again[inner].ravel(), heard[inner].ravel())[0, 1] > 0.9
    # The loudest band follows the tone's jump from 440 Hz to 1760 Hz.
    assert np.mean(again[inner].argmax(axis=1) == heard[inner].argmax(axis=1)) > 0.95


def test_decoded_codes_go_through_the_stores_encodec_model(tiny_store, tmp_path):
    c = tiny_store.manifest["audio"]["codes"]
    assert c["model"] == "random"  # built locally; pretrained models cannot be downloaded here
    codes = torch.from_numpy(np.asarray(tiny_store.codes()[:, 750:900], dtype=np.int64))  # 2 s
    times = c["start_s"] + (750 + np.arange(150) + 0.5) / c["rate_hz"]
    timelines = []
    for shift in (0, 1):
        timeline = lesion_mod.SlotVote(times, slot_s=1 / c["rate_hz"], n_slots=150, max_windows=1)
        logits = torch.nn.functional.one_hot((codes.T + shift) % c["codebook_size"], c["codebook_size"]).float() * 10
        timeline.add(torch.tensor([750 / c["rate_hz"]], dtype=torch.float64), logits[None])
        timelines.append(timeline)
    assert torch.equal(timelines[0].codes(), codes)
    files = lesion_mod._write_code_audio(tmp_path, tiny_store, *timelines)
    assert files["files"] == {"intact": "audio_intact.wav", "lesioned": "audio_lesioned.wav"}
    for name in files["files"].values():
        samples, wav_rate = soundfile.read(str(tmp_path / name), dtype="int16")
        assert wav_rate == c["model_sample_rate"] and samples.ndim == 1
        assert samples.size == 150 * c["model_sample_rate"] // c["rate_hz"] and np.abs(samples).max() > 1000


# --------------------------------------------------------------------------- the atlas


ATLAS_PERMUTATIONS = 19


@pytest.fixture(scope="module")
def truth_atlas(regions, tiny_store, tmp_path_factory):
    """A label image: the truth's auditory region (label 1), its visual region (2), the rest of the mask in cubes (3..)."""
    from giblet.data.parcels import cube_atlas

    _, _, auditory, visual = regions
    mask, affine = tiny_store.mask()
    cubes = cube_atlas(mask, 4)[mask]
    labels = np.zeros(int(mask.sum()), dtype=np.int32)
    rest = ~(auditory | visual)
    _, renumbered = np.unique(cubes[rest], return_inverse=True)
    labels[rest] = renumbered + 3
    labels[auditory], labels[visual] = 1, 2
    values = np.zeros(mask.shape, dtype=np.int32)
    values[mask] = labels
    path = tmp_path_factory.mktemp("atlas") / "truth_atlas.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), str(path))
    return path, labels


@pytest.fixture(scope="module")
def atlas_report(wired_run, truth_atlas, tiny_store):
    result = runner.invoke(app, ["lesion", str(wired_run), "--atlas", str(truth_atlas[0]), "--store", str(tiny_store.path),
                                 "--permutations", str(ATLAS_PERMUTATIONS)])
    assert result.exit_code == 0, result.output
    out = wired_run / "lesion" / "atlas-truth_atlas"
    return out, result.output, json.loads((out / "atlas.json").read_text())


def test_the_atlas_map_finds_the_region_each_modality_is_read_from(atlas_report, truth_atlas):
    _, output, report = atlas_report
    labels = truth_atlas[1]
    by_label = {parcel["label"]: parcel for parcel in report["parcels"]}
    counts = np.bincount(labels)
    mapped = [label for label in range(1, counts.size) if counts[label] >= 5]  # smaller edge cubes are left out
    assert sorted(by_label) == mapped and by_label[1]["voxels"] == int(counts[1])
    assert sorted(report["left_out_parcels"]) == [label for label in range(1, counts.size) if 0 < counts[label] < 5]
    # The wired decoder reads the audio from region 1 and the video from region 2: each tops its modality's ranking,
    # with the smallest p a null of that many random parcels allows, and the smallest q of its modality.
    for name, label in (("audio", 1), ("video", 2)):
        assert report["top"][name][0] == label, (name, report["top"][name][:3])
        entry = by_label[label]["modalities"][name]
        assert entry["p_value"] == 1 / (1 + ATLAS_PERMUTATIONS), entry
        assert entry["q_value"] == min(parcel["modalities"][name]["q_value"] for parcel in report["parcels"])
    assert abs(by_label[1]["modalities"]["video"]["relative_change"]) < 1e-5  # silencing the audio region leaves the video
    assert abs(by_label[2]["modalities"]["audio"]["relative_change"]) < 1e-5
    assert all(parcel["modalities"]["text"]["relative_change"] == 0 for parcel in report["parcels"])  # text reads nothing
    assert "parcels that carry most audio" in output.replace("\n", " ")


def test_the_atlas_p_values_use_one_contiguous_null_per_size_class_and_q_is_benjamini_hochberg(atlas_report):
    from giblet.eval.atlas import SIZE_RATIO, benjamini_hochberg

    _, _, report = atlas_report
    classes = report["null"]["classes"]
    assert report["null"]["permutations"] == ATLAS_PERMUTATIONS and sum(c["parcels"] for c in classes) == len(report["parcels"])
    for parcel in report["parcels"]:
        size = classes[parcel["size_class"]]["size"]
        assert size / SIZE_RATIO <= parcel["voxels"] <= size * SIZE_RATIO, (parcel["label"], parcel["voxels"], size)
    names = ["video", "audio", "text"]
    p = np.array([[parcel["modalities"][name]["p_value"] for parcel in report["parcels"]] for name in names])
    q = np.array([[parcel["modalities"][name]["q_value"] for parcel in report["parcels"]] for name in names])
    np.testing.assert_allclose(q, benjamini_hochberg(p))
    assert np.all(q >= p - 1e-12) and np.all(q <= 1)


def test_the_atlas_says_how_well_the_maps_of_the_two_halves_of_the_windows_agree(atlas_report, wired_run, tiny_store):
    _, output, report = atlas_report
    reliability = report["reliability"]
    assert len(reliability["windows"]) == 2 and sum(reliability["windows"]) == report["windows"]
    assert min(reliability["windows"]) >= report["windows"] // 3  # halves in time, not one batch against the rest
    # The wired regions change their modality's loss in both halves and nothing else does: the halves agree.
    for name in ("video", "audio"):
        r = reliability[name]["split_half_r"]
        assert r > 0.9, (name, r)
        assert reliability[name]["spearman_brown"] == pytest.approx(2 * r / (1 + r))
    assert reliability["text"]["split_half_r"] is None  # no parcel changes the text: nothing to correlate
    assert "map reliability" in output
    # Scoring the halves apart changes nothing of the whole block's losses.
    model, store, _ = load_run(wired_run, tiny_store.path)
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    encoded = lesion_mod._encode(model, WindowDataset(store, "test", "cross_subject"))
    whole = lesion_mod.modality_losses(model, loss, encoded)
    for name, value in whole.items():
        assert report["parcels"][0]["modalities"][name]["loss_intact"] == pytest.approx(value, rel=1e-5)


def test_the_atlas_reads_each_parcel_against_the_whole_brain_silenced(atlas_report, wired_run, tiny_store):
    _, output, report = atlas_report
    whole = report["whole_brain"]
    model, store, _ = load_run(wired_run, tiny_store.path)
    loss = lesion_mod.GibletLoss(scales=lesion_mod.LossScales.from_store(store, model))
    encoded = lesion_mod._encode(model, WindowDataset(store, "test", "cross_subject"))
    silenced = lesion_mod.modality_losses(model, loss, encoded, torch.ones(model.n_units, dtype=torch.bool))
    for name, value in silenced.items():
        assert whole[name]["loss_silenced"] == pytest.approx(value, rel=1e-5)
        assert whole[name]["relative_change"] == pytest.approx((value - whole[name]["loss_intact"]) / whole[name]["loss_intact"])
    by_label = {parcel["label"]: parcel for parcel in report["parcels"]}
    # The wired audio head reads region 1 only, the video head region 2 only: silencing the region is silencing all the
    # decoder reads for that modality, its whole share; the other region's share is nothing.
    for name, label, other in (("audio", 1, 2), ("video", 2, 1)):
        assert whole[name]["relative_change"] > 0
        assert by_label[label]["modalities"][name]["share_of_brain"] == pytest.approx(1.0, abs=1e-3)
        assert abs(by_label[other]["modalities"][name]["share_of_brain"]) < 1e-3
    # Each region holds its modality's part alone: the parcels one at a time add up to the whole brain.
    for name in ("audio", "video"):
        assert whole[name]["parcels_sum_of_shares"] == pytest.approx(1.0, abs=1e-2)
    assert whole["text"]["parcels_sum_of_shares"] is None
    # The text reads nothing from layer 7: silencing the whole brain changes nothing, and no parcel has a share.
    assert whole["text"]["relative_change"] == 0
    assert all(parcel["modalities"]["text"]["share_of_brain"] is None for parcel in report["parcels"])
    assert "whole brain silenced" in output


def test_benjamini_hochberg_matches_the_step_up_rule():
    from giblet.eval.atlas import benjamini_hochberg

    p = np.array([0.01, 0.04, 0.03, 0.2])
    # Sorted 0.01, 0.03, 0.04, 0.2 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.2 -> running minimum from the top.
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.0533333, 0.0533333, 0.2], rtol=1e-5)


def test_the_atlas_maps_hold_each_parcels_change_and_q_and_the_top_parcels_have_roi_reports(atlas_report, truth_atlas, tiny_store):
    out, _, report = atlas_report
    labels = truth_atlas[1]
    mask, _ = tiny_store.mask()
    by_label = {parcel["label"]: parcel for parcel in report["parcels"]}
    for name in ("video", "audio", "text"):
        carries = np.asarray(nib.load(str(out / f"carries_{name}.nii.gz")).dataobj)
        q_map = np.asarray(nib.load(str(out / f"q_{name}.nii.gz")).dataobj)
        assert carries.shape == mask.shape and np.all(carries[~mask] == 0)
        for label in (1, 2, min(label for label in by_label if label > 2)):
            inside = labels == label
            np.testing.assert_allclose(carries[mask][inside], by_label[label]["modalities"][name]["relative_change"], rtol=1e-6)
            np.testing.assert_allclose(q_map[mask][inside], by_label[label]["modalities"][name]["q_value"], rtol=1e-6)
        left_out = np.isin(labels, report["left_out_parcels"])
        assert np.all(carries[mask][left_out] == 0) and np.all(q_map[mask][left_out] == 1)  # as outside the atlas
        assert (out / f"carries_{name}.png").stat().st_size > 1000
    top_audio = json.loads((out / "top_audio" / "lesion.json").read_text())
    assert top_audio["roi_voxels"] == by_label[1]["voxels"] and (out / "top_audio" / "audio_lesioned.wav").is_file()
    assert (out / "top_video" / "frames.mp4").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_lesion_takes_an_roi_or_an_atlas(untrained_run, tiny_store, tmp_path):
    result = runner.invoke(app, ["lesion", str(untrained_run), "--store", str(tiny_store.path)])
    assert result.exit_code != 0 and "--roi" in result.output and "--atlas" in result.output


def test_an_atlas_with_no_parcel_in_the_mask_is_refused_naming_it_and_nothing_is_written(untrained_run, tiny_store, tmp_path):
    mask, affine = tiny_store.mask()
    empty = tmp_path / "empty_atlas.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, 0, 7).astype(np.int32), affine), str(empty))  # labels outside the brain only
    out = tmp_path / "map"
    result = runner.invoke(app, ["lesion", str(untrained_run), "--atlas", str(empty), "--store", str(tiny_store.path), "--out", str(out)])
    text = result.output.replace("\n", "")
    assert result.exit_code != 0 and "empty_atlas.nii.gz" in text and "no voxel inside" in text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
