"""Synthetic datasets in the Sherlock layout, generated from a known ground truth.

``synthesize(out_dir, preset, seed)`` writes::

    out_dir/
      stimuli_Sherlock.m4v                      H.264 (yuv420p) + AAC (44.1 kHz stereo), 25 fps
      annotations.xlsx                          one row per text segment
      sherlock_nii/sherlock_movie_s{N}.nii.gz   4-D NIfTI per subject, 3 mm, TR in zooms[3]
      _truth/                                   the ground truth (read by tests and evaluations only);
                                                _truth/regions.nii.gz labels each region (id + 1, 0 outside),
                                                truth.json's "region_labels" maps each label to its kind

The generative model
--------------------
Clocks. Stimulus time 0 is the first frame and the first TR starts then too. The
movie lasts ``movie_duration_s``; the scan has ``scan_trs`` volumes of ``tr_s``
seconds. Latent features live on a 100 Hz stimulus clock; the neural model runs on a
fine grid of ``FINE_STEP_S`` = 0.05 s that covers the whole scan.

Scenes. The movie is cut into scenes of 3-15 s (the last one up to 18 s). Each scene draws its own visual,
auditory and language values, independently across modalities (only the scene
boundaries are shared). Visual and auditory values change over a 0.4 s ramp at a
boundary; language changes at annotation boundaries.

Visual features (what is drawn; every frame is a flat background with one disk):
``brightness`` (background luminance, 0-1), ``background_warmth`` (-1 blue to +1 red
tint of the background), ``shape_warmth`` (the disk's colour, -1 blue to +1 red),
``shape_size`` (disk radius / frame height), ``shape_x``, ``shape_y`` (disk centre as
a fraction of the frame width / height, from the top), ``motion_speed`` (disk speed in
frame heights per second: the motion energy). The disk moves in a straight line
with the scene's direction and speed and bounces off the frame's inner margins. All
are resolution independent and visible in 160x90 frames.

Auditory features (what is heard; both channels carry the same signal):
``tone_pitch`` (log2 of the tone frequency in Hz, 200-1600 Hz), ``tone_loudness``
(the tone's peak amplitude; 0.03 in quiet scenes, never silent, so the pitch stays
audible), ``noise_energy`` (short-term power of
80 ms white-noise bursts, 0.25 s moving average; bursts arrive as a Poisson process
whose rate, 0-4 per second, is a scene value). The tone has a second harmonic at 0.3.
If ``espeak-ng`` is on the PATH, each annotation's sentence is also spoken at its
start (cut at its end); speech is not a feature: it only repeats the text.

Language features (what is written): each scene has a location, one or two
characters and a topic, drawn from the vocabularies ``LOCATIONS``, ``CHARACTERS``,
``TOPICS``. A scene is split into annotation segments (1.2-3 s of scene each), which
sometimes leave a gap before the next one and sometimes start before the previous
one ends. Each segment's sentence names the characters, the action of the topic
(sometimes another topic) and the location. Its feature vector is the one-hot
location, the one-hot topic and the characters' indicator averaged over the names
(18 values). At time t the language features are the mean over the segments covering
t, and 0 where none does (the model sees no text there).

Brain. The mask is an irregular ellipsoid (the ``mask_voxels`` lowest values of a
bumpy ellipsoidal distance) inside the grid, on a 3 mm MNI-like affine. It is cut
into ``n_regions`` contiguous regions grown from spread-out seeds (shortest paths
over a random, spatially smooth cost). Regions covering 10-20% of the mask carry
noise only; the others are ``visual``, ``auditory``, ``language`` (one modality) or
``mixed`` (two or three), every kind present.

Signal. Each signal region has ``units_per_region`` neural units. A unit responds
to its modality's features z (standardized over the movie) as
``u(t) = phi(a * (w . z(t) + b))`` with w a random unit vector over 1-4 features, phi
tanh or softplus; u is centred and scaled to unit variance over the movie and held at
0 (its movie mean) after the movie ends. A voxel's neural activity is a mix of its
region's units with weights that vary smoothly in space (softmax of smooth fields).
That activity is convolved with the causal canonical HRF (``convolve_hrf``, Glover,
peak ~5.2 s), sampled at the middle of each TR, time (t + 0.5) * TR, and scaled to a
standard deviation over the movie TRs of 1-2.5% of the voxel's baseline: that is
``_truth/signal.npy`` (0 for noise-only voxels). A model sees TR t through the window
[t * TR - lookback, (t + 1) * TR), so every input to TR t's response lies in it once
the lookback covers the HRF.

Subjects. Subject i's voxel v at TR t is
``baseline_iv + gain_i * signal_tv + shared_tv + private_itv`` where the baseline is a
smooth 500-1500 map (scaled per subject), ``gain_i`` is in [0.8, 1.2], ``shared`` is
noise common to all subjects that no stimulus drives (spatially smooth, AR(1) in
time), and ``private`` is each subject's own noise: half spatially smooth, half
white, AR(1) in time (phi 0.5), with a subject-specific level. Noise levels are set
per voxel from a spatially smooth target noise ceiling (0.40-0.90, mean ~0.65).
Outside the mask every value is exactly 0 at every TR. tiny stores float32; the
larger presets store int16 with scl_slope (scl_inter 0, so 0 stays exactly 0).

Real-data quirks (``SynthPreset`` fields; the ``sherlock-quirks`` preset has them all at a small size).
``preshift_trs`` P: the fMRI is written shifted earlier by P TRs, as the published Sherlock data were by 3 to
absorb the haemodynamic lag: row t of every file (and of ``_truth/signal.npy``) is the response at TR t + P,
sampled at (t + P + 0.5) * TR, so an impulse in the movie first shows P TRs early; the stimulus files and
``_truth/features.npz`` keep the movie's clock (train with ``alignment.preshift_trs: P``). ``short_subjects``:
(subject, n) pairs whose file lacks its last n TRs (Sherlock's s5 lacks 50). ``sherlock_workbook``: the
annotation workbook has the release's columns in its order (a segment number first, TR columns and more
columns giblet does not read); every workbook's time and text headers end in a space, as the release's do.

Noise ceiling. ``_truth/noise_ceiling.npy`` is, per mask voxel, the correlation over
the movie TRs between the true signal and the mean over subjects expected from the
variances: ``g * s / sqrt(g^2 s^2 + shared^2 + sum_i private_i^2 / N^2)`` with g the
mean gain and s the signal's standard deviation; ``noise_ceiling_empirical.npy`` is
that correlation measured on the written data. Both are 0 for noise-only voxels.

Determinism: a (preset, seed) pair always gives the same fMRI arrays, annotations,
frames' content and truth (the gzip and mp4 containers may differ in timestamps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import warnings
import zlib
import dataclasses
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage, sparse
from scipy.signal import resample_poly
from scipy.sparse.csgraph import dijkstra

from giblet.data.alignment import convolve_hrf
from giblet.data.fmri import pearson_r
from giblet.errors import ConfigError, DataError
from giblet.progress import bar

MOVIE_NAME = "stimuli_Sherlock.m4v"
ANNOTATIONS_NAME = "annotations.xlsx"
FMRI_FOLDER = "sherlock_nii"
FMRI_PATTERN = "sherlock_movie_s{subject}.nii.gz"
TRUTH_FOLDER = "_truth"

# The real file's first three headers end in a space; "Camera Angle" is an extra column readers must ignore.
ANNOTATION_COLUMNS = ("Start Time (s) ", "End Time (s) ", "Scene Details - A Level ", "Name - All", "Location",
                      "Camera Angle")
# The release's workbook (Sherlock_Segments_1000_NN_2017.xlsx) in its column order, stray trailing spaces included;
# giblet reads the start, end and scene-details columns by name and no other.
SHERLOCK_ANNOTATION_COLUMNS = ("Segment Number", "Start Time (s) ", "End Time (s) ", "Start TR", "End TR",
                               "Scene Segments", "Scene Details - A Level ", "Space-In/Outdoor", "Name - All",
                               "Name - Focus", "Name - Speaking", "Location", "Camera Angle", "Music Presence ",
                               "Words on Screen ")

STIMULUS_CLOCK_HZ = 100
FINE_STEP_S = 0.05
HRF_KIND = "glover"

VISUAL_FEATURES = ("brightness", "background_warmth", "shape_warmth", "shape_size", "shape_x", "shape_y",
                   "motion_speed")
AUDITORY_FEATURES = ("tone_pitch", "tone_loudness", "noise_energy")
CHARACTERS = ("Ada", "Boris", "Clara", "Dmitri", "Edith", "Felix")
LOCATIONS = ("kitchen", "train station", "forest", "hospital", "rooftop", "library")
# (topic, action for one person, action for two people)
TOPICS = (
    ("money", "argues about money", "argue about money"),
    ("music", "plays the violin", "play the violin"),
    ("food", "cooks a meal", "cook a meal"),
    ("chase", "chases a thief", "chase a thief"),
    ("letter", "reads an old letter", "read an old letter"),
    ("joke", "laughs at a joke", "laugh at a joke"),
)
LANGUAGE_FEATURES = (
    tuple(f"character_{name}" for name in CHARACTERS)
    + tuple(f"location_{place.replace(' ', '_')}" for place in LOCATIONS)
    + tuple(f"topic_{topic[0]}" for topic in TOPICS)
)
MODALITIES = ("visual", "auditory", "language")
REGION_KINDS = ("visual", "auditory", "language", "mixed", "noise")
CAMERA_ANGLES = ("wide", "medium", "close up", "over the shoulder")
SENTENCE_TEMPLATES = (
    "{names} {action} in the {location}.",
    "In the {location}, {names} {action}.",
    "{names} {action} while everyone else in the {location} watches.",
)

SCENE_SECONDS = (3.0, 15.0)
SEGMENT_SECONDS = (1.2, 3.0)
TRANSITION_S = 0.4
QUIET_LOUDNESS = 0.03
BURST_S = 0.08
MAX_BURST_RATE = 4.0
NOISE_ENERGY_WINDOW_S = 0.25
NOISE_AR_PHI = 0.5
SHARED_NOISE_FRACTION = 0.2  # of the group mean's noise variance
SMOOTH_NOISE_FRACTION = 0.5  # of each subject's private noise variance
CEILING_MEAN, CEILING_SPREAD, CEILING_RANGE = 0.65, 0.12, (0.40, 0.90)
INT16_FULL_SCALE = 32000


@dataclass(frozen=True)
class SynthPreset:
    """The sizes of one synthetic dataset; a (preset, seed) pair names exactly one dataset."""

    name: str
    n_subjects: int
    tr_s: float
    movie_duration_s: float
    scan_trs: int  # volumes per NIfTI file; more than the movie covers for sherlock-scale, as in Sherlock
    frame_width: int
    frame_height: int
    grid_shape: Tuple[int, int, int]
    mask_voxels: int
    n_regions: int
    fmri_dtype: str  # "float32" or "int16" (with scl_slope)
    units_per_region: int = 8
    noise_maps: int = 32  # spatially smooth maps behind each subject's smooth noise
    fps: float = 25.0  # may be fractional (23.976): frame k is shown at k / fps seconds
    audio_rate: int = 44100
    noise_scale: float = 1.0  # multiplies every noise standard deviation (the ceilings fall accordingly)
    preshift_trs: int = 0  # the fMRI written shifted earlier by this many TRs (row t = the response at TR t + P)
    short_subjects: Tuple[Tuple[int, int], ...] = ()  # (subject number from 1, TRs its file lacks at the end)
    sherlock_workbook: bool = False  # annotations with the release's columns (SHERLOCK_ANNOTATION_COLUMNS)

    def __post_init__(self) -> None:
        steps_per_half_tr = self.tr_s / (2 * FINE_STEP_S)
        if abs(steps_per_half_tr - round(steps_per_half_tr)) > 1e-9:
            raise ValueError(f"TR {self.tr_s} s: its middle must fall on the {FINE_STEP_S} s grid")
        if self.scan_trs < self.movie_trs:
            raise ValueError(f"{self.scan_trs} scan TRs cannot cover the {self.movie_trs} TRs of the movie")
        if self.fmri_dtype not in ("float32", "int16"):
            raise ValueError(f"fmri_dtype must be float32 or int16, got {self.fmri_dtype!r}")
        if not self.fps > 0 or not self.noise_scale > 0 or not self.tr_s > 0:
            raise ValueError(f"tr_s {self.tr_s}, fps {self.fps} and noise_scale {self.noise_scale} must be positive")
        if int(self.preshift_trs) != self.preshift_trs or self.preshift_trs < 0:
            raise ValueError(f"preshift_trs must be a whole number of TRs >= 0, got {self.preshift_trs!r}")
        for subject, missing in self.short_subjects:
            if not 1 <= subject <= self.n_subjects or not 0 < missing < self.scan_trs:
                raise ValueError(f"short subject {(subject, missing)}: expected (a subject in 1-{self.n_subjects}, "
                                 f"0 < missing TRs < {self.scan_trs})")

    def subject_trs(self, subject: int) -> int:
        """Volumes in the file of ``subject`` (counted from 0): ``scan_trs`` less what ``short_subjects`` cuts."""
        return self.scan_trs - dict(self.short_subjects).get(subject + 1, 0)

    @property
    def movie_trs(self) -> int:
        """TRs whose whole interval lies inside the movie."""
        return int(math.floor(self.movie_duration_s / self.tr_s + 1e-9))

    @property
    def n_frames(self) -> int:
        return int(round(self.movie_duration_s * self.fps))

    @property
    def n_audio_samples(self) -> int:
        return int(round(self.movie_duration_s * self.audio_rate))


PRESETS: Dict[str, SynthPreset] = {
    "tiny": SynthPreset("tiny", n_subjects=3, tr_s=1.5, movie_duration_s=360.0, scan_trs=240, frame_width=320,
                        frame_height=180, grid_shape=(24, 28, 24), mask_voxels=4000, n_regions=10,
                        fmri_dtype="float32"),
    "small": SynthPreset("small", n_subjects=5, tr_s=1.5, movie_duration_s=900.0, scan_trs=600, frame_width=320,
                         frame_height=180, grid_shape=(30, 36, 30), mask_voxels=10000, n_regions=20,
                         fmri_dtype="int16"),
    "sherlock-scale": SynthPreset("sherlock-scale", n_subjects=17, tr_s=1.5, movie_duration_s=1426.0, scan_trs=1976,
                                  frame_width=640, frame_height=360, grid_shape=(61, 73, 61), mask_voxels=85810,
                                  n_regions=64, fmri_dtype="int16", units_per_region=12),
    # The real release's quirks (configs/sherlock.yaml) at tiny's size: the fMRI shifted earlier by 3 TRs, s5's
    # file 25 TRs short (the release's s5 lacks 50), scans running past the movie, the release's workbook columns.
    "sherlock-quirks": SynthPreset("sherlock-quirks", n_subjects=5, tr_s=1.5, movie_duration_s=360.0, scan_trs=250,
                                   frame_width=320, frame_height=180, grid_shape=(24, 28, 24), mask_voxels=4000,
                                   n_regions=10, fmri_dtype="int16", preshift_trs=3, short_subjects=((5, 25),),
                                   sherlock_workbook=True),
}


def preset_variant(name: str, tr_s: Optional[float] = None, fps: Optional[float] = None,
                   noise_scale: Optional[float] = None, preshift_trs: Optional[int] = None) -> SynthPreset:
    """The preset ``name`` with another TR, frame rate, noise level or pre-shift of the fMRI (``preshift_trs``
    TRs earlier): a dataset giblet's settings were not chosen on. The scan keeps its duration in seconds (the
    number of volumes follows the TR)."""
    base = _resolve_preset(name)
    changes: Dict[str, object] = {}
    if preshift_trs is not None:
        changes["preshift_trs"] = int(preshift_trs)
    if tr_s is not None:
        changes.update(tr_s=float(tr_s), scan_trs=int(math.ceil(base.scan_trs * base.tr_s / float(tr_s) - 1e-9)))
    if fps is not None:
        changes["fps"] = float(fps)
    if noise_scale is not None:
        changes["noise_scale"] = float(noise_scale)
    if not changes:
        return base
    label = "".join(f"-{key}{value:g}" for key, value in (("tr", tr_s), ("fps", fps), ("noise", noise_scale),
                                                          ("preshift", preshift_trs)) if value is not None)
    try:
        return dataclasses.replace(base, name=base.name + label, **changes)
    except ValueError as error:
        raise ConfigError(f"synthetic preset {name!r} with {label.lstrip('-')}: {error}") from None


def synthesize(out_dir: Union[str, Path], preset: Union[str, SynthPreset] = "tiny", seed: int = 0,
               progress: bool = True) -> Path:
    """Write a Sherlock-layout dataset and its ground truth into the new folder ``out_dir``; returns it.

    ``preset`` is a name in ``PRESETS`` or a ``SynthPreset``. ``progress`` shows progress bars where
    ``giblet.progress`` enables them (a terminal, or GIBLET_PROGRESS=1). Everything is written into a
    hidden folder beside ``out_dir`` and renamed at the end, so an interrupted run leaves nothing behind.
    """
    config = _resolve_preset(preset)
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    _require_new_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.synth-", dir=out_dir.parent))
    show = None if progress else False
    try:
        world = _build_world(config, int(seed))
        spoken_segments = _write_movie(work_dir / MOVIE_NAME, world, show)
        _write_annotations(work_dir / ANNOTATIONS_NAME, world.segments, config)
        truth_dir = work_dir / TRUTH_FOLDER
        truth_dir.mkdir()
        _write_brain_truth(truth_dir, world)
        empirical = _write_subjects(work_dir / FMRI_FOLDER, world, show)
        _write_summary(truth_dir, world, empirical, spoken_segments, time.perf_counter() - started)
        _require_new_folder(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------- the world: features, brain, signal


@dataclass
class Segment:
    """One annotation row and the language features it carries."""

    start_s: float
    end_s: float
    text: str
    names: str
    location: str
    camera_angle: str
    features: np.ndarray  # (len(LANGUAGE_FEATURES),)


@dataclass
class _World:
    """Everything that is generated before writing: stimulus features, the brain and the noise-free signal."""

    preset: SynthPreset
    seed: int
    scene_starts: np.ndarray
    segments: List[Segment]
    stimulus_visual: np.ndarray  # (n_stimulus_samples, len(VISUAL_FEATURES)) on the 100 Hz clock
    stimulus_auditory: np.ndarray  # (n_stimulus_samples, len(AUDITORY_FEATURES))
    burst_onsets_s: np.ndarray
    burst_amplitudes: np.ndarray
    fine_features: Dict[str, np.ndarray]  # modality -> (n_fine, n_features), 0 after the movie
    affine: np.ndarray
    mask: np.ndarray  # (X, Y, Z) bool
    region_of_voxel: np.ndarray  # (V,) int
    region_kinds: List[str]
    units: Dict[str, np.ndarray]
    unit_weights: np.ndarray  # (V, units_per_region)
    modality_weights: np.ndarray  # (V, 3)
    signal: np.ndarray  # (n_trs, V) float32
    baseline: np.ndarray  # (V,)
    amplitude: np.ndarray  # (V,) standard deviation of the signal over the movie TRs
    shared_noise_std: np.ndarray  # (V,)
    private_noise_std: np.ndarray  # (V,) for a subject with noise level 1
    subject_gains: np.ndarray
    subject_noise_levels: np.ndarray
    subject_baseline_scales: np.ndarray
    noise_ceiling: np.ndarray  # (V,) analytic


def _resolve_preset(preset: Union[str, SynthPreset]) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _require_new_folder(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(path, "exists and is not an empty folder", expected="a new or empty folder",
                        fix="choose another output folder or remove this one")


def _rng(seed: int, *keys: Union[str, int]) -> np.random.Generator:
    """An independent generator per purpose, so adding a draw in one place never shifts another."""
    words = [seed] + [zlib.crc32(key.encode()) if isinstance(key, str) else int(key) for key in keys]
    return np.random.default_rng(words)


def _smooth_field(shape: Sequence[int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with mean 0 and standard deviation 1."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def _build_world(preset: SynthPreset, seed: int) -> _World:
    scene_starts, scene_values = _make_scenes(preset, seed)
    segments = _make_segments(preset, seed, scene_starts, scene_values)
    visual, auditory, burst_onsets, burst_amplitudes = _stimulus_features(preset, seed, scene_starts, scene_values)
    fine = _fine_features(preset, visual, auditory, segments)
    affine = _affine(preset.grid_shape)
    mask = _brain_mask(preset, seed)
    region_of_voxel = _grow_regions(mask, preset.n_regions, seed)
    region_kinds = _assign_region_kinds(region_of_voxel, preset.n_regions, seed)
    units = _make_units(preset, seed, region_kinds)
    unit_weights = _voxel_unit_weights(preset, seed, mask, region_of_voxel)
    signal, modality_weights, baseline, amplitude = _voxel_signal(preset, seed, mask, fine, region_of_voxel,
                                                                  region_kinds, units, unit_weights)
    subject_rng = _rng(seed, "subjects")
    gains = subject_rng.uniform(0.8, 1.2, preset.n_subjects)
    noise_levels = subject_rng.uniform(0.8, 1.25, preset.n_subjects)
    baseline_scales = subject_rng.uniform(0.9, 1.1, preset.n_subjects)
    shared_std, private_std, ceiling = _noise_levels(preset, seed, mask, region_of_voxel, region_kinds, amplitude,
                                                     gains, noise_levels)
    return _World(preset, seed, scene_starts, segments, visual, auditory, burst_onsets, burst_amplitudes, fine, affine,
                  mask, region_of_voxel, region_kinds, units, unit_weights, modality_weights, signal, baseline,
                  amplitude, shared_std, private_std, gains, noise_levels, baseline_scales, ceiling)


def _make_scenes(preset: SynthPreset, seed: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Scene start times and each scene's latent values."""
    rng = _rng(seed, "scenes")
    starts = [0.0]
    while True:
        next_start = starts[-1] + rng.uniform(*SCENE_SECONDS)
        if next_start >= preset.movie_duration_s - SCENE_SECONDS[0]:
            break
        starts.append(next_start)
    n = len(starts)
    moving = rng.uniform(size=n) > 0.25
    quiet = rng.uniform(size=n) < 0.2
    bursty = rng.uniform(size=n) > 0.3
    values = {
        "brightness": rng.uniform(0.15, 0.8, n),
        "background_warmth": rng.uniform(-1, 1, n),
        "shape_warmth": rng.uniform(-1, 1, n),
        "shape_size": rng.uniform(0.05, 0.15, n),
        "speed": np.where(moving, rng.uniform(0.05, 0.6, n), 0.0),
        "direction": rng.uniform(0, 2 * np.pi, n),
        "tone_pitch": rng.uniform(np.log2(200), np.log2(1600), n),
        # Quiet, never silent: the pitch a unit may respond to must stay audible.
        "tone_loudness": np.where(quiet, QUIET_LOUDNESS, rng.uniform(0.05, 0.4, n)),
        "burst_rate": np.where(bursty, rng.uniform(0.5, MAX_BURST_RATE, n), 0.0),
        "location": rng.integers(0, len(LOCATIONS), n),
        "topic": rng.integers(0, len(TOPICS), n),
        "first_character": rng.integers(0, len(CHARACTERS), n),
        "second_character": np.where(rng.uniform(size=n) < 0.4,
                                     rng.integers(0, len(CHARACTERS), n), -1),
    }
    return np.asarray(starts), values


def _make_segments(preset: SynthPreset, seed: int, scene_starts: np.ndarray,
                   values: Dict[str, np.ndarray]) -> List[Segment]:
    """Annotation rows: a few per scene, with occasional gaps and overlaps, times on a 0.1 s grid."""
    rng = _rng(seed, "annotations")
    scene_ends = np.append(scene_starts[1:], preset.movie_duration_s)
    segments: List[Segment] = []
    for scene, (scene_start, scene_end) in enumerate(zip(scene_starts, scene_ends)):
        n_parts = max(1, int(round((scene_end - scene_start) / rng.uniform(*SEGMENT_SECONDS))))
        cuts = np.sort(rng.uniform(scene_start, scene_end, n_parts - 1))
        bounds = np.concatenate([[scene_start], cuts, [scene_end]])
        characters = [values["first_character"][scene]]
        second = values["second_character"][scene]
        if second >= 0 and second != characters[0]:
            characters.append(second)
        for part in range(n_parts):
            start, end = bounds[part], bounds[part + 1]
            if rng.uniform() < 0.12:  # a gap: this row ends before the next begins
                end -= rng.uniform(0.5, 1.5)
            if segments and rng.uniform() < 0.12:  # an overlap: this row begins before the previous ends
                start -= rng.uniform(0.3, 1.2)
            start = max(0.0, round(start, 1))
            end = min(preset.movie_duration_s, round(end, 1))
            if end - start < 0.5:
                continue
            topic = values["topic"][scene] if rng.uniform() < 0.75 else rng.integers(0, len(TOPICS))
            location = values["location"][scene]
            names = [CHARACTERS[c] for c in characters]
            action = TOPICS[topic][1] if len(names) == 1 else TOPICS[topic][2]
            template = SENTENCE_TEMPLATES[rng.integers(0, len(SENTENCE_TEMPLATES))]
            text = template.format(names=" and ".join(names), action=action, location=LOCATIONS[location])
            text = text[0].upper() + text[1:]
            features = np.zeros(len(LANGUAGE_FEATURES))
            features[characters] = 1.0 / len(characters)
            features[len(CHARACTERS) + location] = 1.0
            features[len(CHARACTERS) + len(LOCATIONS) + topic] = 1.0
            angle = CAMERA_ANGLES[rng.integers(0, len(CAMERA_ANGLES))]
            segments.append(Segment(float(start), float(end), text, ", ".join(names), LOCATIONS[location], angle,
                                    features))
    segments.sort(key=lambda segment: (segment.start_s, segment.end_s))
    return segments


def _per_sample(scene_starts: np.ndarray, scene_values: np.ndarray, n_samples: int) -> np.ndarray:
    """Scene values on the 100 Hz clock, changing over a linear ramp of TRANSITION_S at each boundary."""
    times = np.arange(n_samples) / STIMULUS_CLOCK_HZ
    scene = np.searchsorted(scene_starts, times, side="right") - 1
    ramp = int(round(TRANSITION_S * STIMULUS_CLOCK_HZ))
    return ndimage.uniform_filter1d(scene_values[scene].astype(np.float64), ramp, axis=0, mode="nearest")


def _fold(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """An unbounded path reflected into [low, high], like a ball bouncing between two walls."""
    span = high - low
    phase = np.mod(position - low, 2 * span)
    return low + np.where(phase <= span, phase, 2 * span - phase)


def _stimulus_features(preset: SynthPreset, seed: int, scene_starts: np.ndarray, values: Dict[str, np.ndarray]):
    """Visual and auditory features on the 100 Hz clock, plus the noise bursts that are heard."""
    rng = _rng(seed, "stimulus")
    n = int(round(preset.movie_duration_s * STIMULUS_CLOCK_HZ))

    def per_sample(key: str) -> np.ndarray:
        return _per_sample(scene_starts, values[key], n)

    aspect = preset.frame_width / preset.frame_height
    velocity_x = _per_sample(scene_starts, values["speed"] * np.cos(values["direction"]), n)
    velocity_y = _per_sample(scene_starts, values["speed"] * np.sin(values["direction"]), n)
    # Positions in frame heights; the margins keep most of the disk inside the frame.
    path_x = rng.uniform(0.3, aspect - 0.3) + np.cumsum(velocity_x) / STIMULUS_CLOCK_HZ
    path_y = rng.uniform(0.3, 0.7) + np.cumsum(velocity_y) / STIMULUS_CLOCK_HZ
    shape_x = _fold(path_x, 0.15, aspect - 0.15) / aspect
    shape_y = _fold(path_y, 0.15, 0.85)
    visual = np.stack([per_sample("brightness"), per_sample("background_warmth"), per_sample("shape_warmth"),
                       per_sample("shape_size"), shape_x, shape_y, np.hypot(velocity_x, velocity_y)], axis=1)

    # Poisson bursts at the scene's rate, by thinning a process at the highest rate.
    rate = per_sample("burst_rate")
    n_candidates = rng.poisson(MAX_BURST_RATE * preset.movie_duration_s)
    candidates = np.sort(rng.uniform(0, preset.movie_duration_s - BURST_S, n_candidates))
    kept = rng.uniform(size=candidates.size) < rate[(candidates * STIMULUS_CLOCK_HZ).astype(int)] / MAX_BURST_RATE
    onsets = candidates[kept]
    amplitudes = rng.uniform(0.15, 0.3, onsets.size)
    power = np.zeros(n)
    envelope = np.hanning(int(round(BURST_S * STIMULUS_CLOCK_HZ)) + 2)[1:-1] ** 2
    for onset, amplitude in zip(onsets, amplitudes):
        first = int(round(onset * STIMULUS_CLOCK_HZ))
        stop = min(n, first + envelope.size)
        power[first:stop] += amplitude ** 2 * envelope[: stop - first]
    window = int(round(NOISE_ENERGY_WINDOW_S * STIMULUS_CLOCK_HZ))
    noise_energy = ndimage.uniform_filter1d(power, window, mode="nearest")
    auditory = np.stack([per_sample("tone_pitch"), per_sample("tone_loudness"), noise_energy], axis=1)
    return visual, auditory, onsets, amplitudes


def _fine_features(preset: SynthPreset, visual: np.ndarray, auditory: np.ndarray,
                   segments: List[Segment]) -> Dict[str, np.ndarray]:
    """Features on the fine grid over the whole scan; 0 after the movie ends."""
    n_fine = int(round(preset.scan_trs * preset.tr_s / FINE_STEP_S))
    times = np.arange(n_fine) * FINE_STEP_S
    step = int(round(FINE_STEP_S * STIMULUS_CLOCK_HZ))
    in_movie = np.arange(n_fine) * step < visual.shape[0]
    n_in = int(in_movie.sum())
    fine = {}
    for name, stream in (("visual", visual), ("auditory", auditory)):
        out = np.zeros((n_fine, stream.shape[1]))
        out[:n_in] = stream[::step][:n_in]
        fine[name] = out
    language_sum = np.zeros((n_fine, len(LANGUAGE_FEATURES)))
    covering = np.zeros(n_fine)
    for segment in segments:
        first, stop = np.searchsorted(times, [segment.start_s - 1e-9, segment.end_s - 1e-9])
        language_sum[first:stop] += segment.features
        covering[first:stop] += 1
    fine["language"] = language_sum / np.maximum(covering, 1)[:, None]
    fine["in_movie"] = in_movie
    return fine


def _affine(grid_shape: Tuple[int, int, int]) -> np.ndarray:
    """3 mm, x flipped (radiological storage as in MNI templates); Sherlock's own grid gets MNI's origin."""
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    if tuple(grid_shape) == (61, 73, 61):
        affine[:3, 3] = (90.0, -126.0, -72.0)
    else:
        centre = (np.asarray(grid_shape) - 1) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _brain_mask(preset: SynthPreset, seed: int) -> np.ndarray:
    """The ``mask_voxels`` voxels closest to the centre by a bumpy ellipsoidal distance, off the grid border."""
    shape = np.asarray(preset.grid_shape)
    coordinates = np.indices(preset.grid_shape).astype(np.float64)
    centre = (shape - 1) / 2.0
    distance = np.sqrt(sum(((coordinates[axis] - centre[axis]) / (shape[axis] / 2.0)) ** 2 for axis in range(3)))
    bumps = _smooth_field(preset.grid_shape, max(1.5, shape.min() / 8.0), _rng(seed, "mask"))
    score = distance * (1.0 + 0.08 * bumps)
    border = np.ones(preset.grid_shape, dtype=bool)
    border[1:-1, 1:-1, 1:-1] = False
    score[border] = np.inf
    if preset.mask_voxels > int(np.isfinite(score).sum()):
        raise ValueError(f"{preset.mask_voxels} mask voxels do not fit a {preset.grid_shape} grid")
    keep = np.argsort(score, axis=None, kind="stable")[: preset.mask_voxels]
    mask = np.zeros(preset.grid_shape, dtype=bool)
    mask.flat[keep] = True
    return mask


def _grow_regions(mask: np.ndarray, n_regions: int, seed: int) -> np.ndarray:
    """Region id per mask voxel: nearest spread-out seed along shortest paths of a smooth random cost."""
    rng = _rng(seed, "regions")
    coordinates = np.argwhere(mask)
    n_voxels = coordinates.shape[0]
    # k-means (k-means++ start, a few Lloyd steps) spreads the seeds, so regions come out of similar size.
    seeds = [int(rng.integers(n_voxels))]
    nearest = np.sum((coordinates - coordinates[seeds[0]]) ** 2, axis=1).astype(np.float64)
    for _ in range(n_regions - 1):
        seeds.append(int(rng.choice(n_voxels, p=nearest / nearest.sum())))
        nearest = np.minimum(nearest, np.sum((coordinates - coordinates[seeds[-1]]) ** 2, axis=1))
    centres = coordinates[seeds].astype(np.float64)
    for _ in range(10):
        label = _nearest_centre(coordinates, centres)
        for region in range(n_regions):
            members = coordinates[label == region]
            if members.size:
                centres[region] = members.mean(axis=0)
    # Each seed is the mask voxel nearest its centre (a centre can fall outside a curved mask).
    seeds = [int(np.argmin(np.sum((coordinates - centre) ** 2, axis=1))) for centre in centres]
    if len(set(seeds)) < n_regions:
        raise ValueError(f"{n_regions} regions do not fit {n_voxels} mask voxels")
    cost = np.exp(0.3 * _smooth_field(mask.shape, 2.0, rng))[mask]
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = np.arange(n_voxels)
    rows, columns = [], []
    for axis in range(3):
        here = [slice(None)] * 3
        there = [slice(None)] * 3
        here[axis], there[axis] = slice(0, -1), slice(1, None)
        pairs = mask[tuple(here)] & mask[tuple(there)]
        rows.append(index[tuple(here)][pairs])
        columns.append(index[tuple(there)][pairs])
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    graph = sparse.csr_matrix((0.5 * (cost[rows] + cost[columns]), (rows, columns)), shape=(n_voxels, n_voxels))
    _, _, sources = dijkstra(graph, directed=False, indices=seeds, min_only=True, return_predecessors=True)
    region_of_seed = {voxel: region for region, voxel in enumerate(seeds)}
    # A voxel unreachable from any seed (a detached island of the mask) joins the nearest seed's region.
    unreachable = sources < 0
    if unreachable.any():
        distances = ((coordinates[unreachable][:, None, :] - coordinates[seeds][None, :, :]) ** 2).sum(-1)
        sources[unreachable] = np.asarray(seeds)[distances.argmin(1)]
    return np.array([region_of_seed[source] for source in sources], dtype=np.int32)


def _nearest_centre(coordinates: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (coordinates**2).sum(1)[:, None] - 2.0 * coordinates @ centres.T + (centres**2).sum(1)[None, :]
    return squared.argmin(axis=1)


def _assign_region_kinds(region_of_voxel: np.ndarray, n_regions: int, seed: int) -> List[str]:
    """Noise-only regions covering 10-20% of the mask; the rest cycle through visual, auditory, language, mixed."""
    if n_regions < 6:
        raise ValueError("a preset needs at least 6 regions: four signal kinds plus noise-only ones")
    rng = _rng(seed, "region kinds")
    sizes = np.bincount(region_of_voxel, minlength=n_regions)
    total = sizes.sum()
    noise: List[int] = []
    for region in rng.permutation(n_regions):
        if sizes[noise].sum() >= 0.10 * total or len(noise) >= n_regions - 4:
            break
        if sizes[noise].sum() + sizes[region] <= 0.20 * total:
            noise.append(int(region))
    if not noise:
        noise.append(int(np.argmin(sizes)))
    signal_regions = [region for region in rng.permutation(n_regions) if region not in noise]
    kinds = [""] * n_regions
    for region in noise:
        kinds[region] = "noise"
    for order, region in enumerate(signal_regions):
        kinds[region] = REGION_KINDS[order % 4] if order < 4 else REGION_KINDS[int(rng.integers(0, 4))]
    return kinds


def _make_units(preset: SynthPreset, seed: int, region_kinds: List[str]) -> Dict[str, np.ndarray]:
    """Each region's neural units: modality, sparse projection, bias, slope and nonlinearity."""
    rng = _rng(seed, "units")
    widths = {"visual": len(VISUAL_FEATURES), "auditory": len(AUDITORY_FEATURES), "language": len(LANGUAGE_FEATURES)}
    n_units = len(region_kinds) * preset.units_per_region
    modality = np.full(n_units, -1, dtype=np.int32)
    projection = np.zeros((n_units, max(widths.values())))
    bias = rng.normal(0.0, 0.5, n_units)
    slope = rng.uniform(1.0, 2.0, n_units)
    nonlinearity = rng.integers(0, 2, n_units).astype(np.int32)  # 0 tanh, 1 softplus
    for region, kind in enumerate(region_kinds):
        if kind == "noise":
            continue
        if kind == "mixed":
            chosen = rng.permutation(3)[: int(rng.integers(2, 4))]
        else:
            chosen = np.array([MODALITIES.index(kind)])
        for k in range(preset.units_per_region):
            unit = region * preset.units_per_region + k
            modality[unit] = chosen[k % chosen.size]
            width = widths[MODALITIES[modality[unit]]]
            active = rng.choice(width, size=int(rng.integers(1, min(4, width) + 1)), replace=False)
            weights = rng.normal(size=active.size)
            projection[unit, active] = weights / np.linalg.norm(weights)
    return {"modality": modality, "projection": projection, "bias": bias, "slope": slope, "nonlinearity": nonlinearity}


def _voxel_unit_weights(preset: SynthPreset, seed: int, mask: np.ndarray, region_of_voxel: np.ndarray) -> np.ndarray:
    """Per voxel, softmax weights over its region's units that drift smoothly through space."""
    rng = _rng(seed, "unit weights")
    k = preset.units_per_region
    fields = np.stack([_smooth_field(mask.shape, 2.0, rng)[mask] for _ in range(k)], axis=1)
    region_logits = rng.normal(0.0, 0.7, (preset.n_regions, k))
    permutations = np.stack([rng.permutation(k) for _ in range(preset.n_regions)])
    signs = rng.choice([-1.0, 1.0], size=(preset.n_regions, k))
    logits = 1.5 * signs[region_of_voxel] * np.take_along_axis(fields, permutations[region_of_voxel], axis=1)
    logits += region_logits[region_of_voxel]
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def _unit_activity(preset: SynthPreset, fine: Dict[str, np.ndarray], units: Dict[str, np.ndarray],
                   unit_ids: np.ndarray) -> np.ndarray:
    """Neural activity of the given units on the fine grid, unit variance over the movie, 0 after it."""
    in_movie = fine["in_movie"]
    activity = np.zeros((in_movie.size, unit_ids.size))
    for column, unit in enumerate(unit_ids):
        features = fine[MODALITIES[units["modality"][unit]]]
        movie = features[in_movie]
        std = movie.std(axis=0)
        z = (movie - movie.mean(axis=0)) / np.where(std > 0, std, 1.0)
        width = features.shape[1]
        drive = units["slope"][unit] * (z @ units["projection"][unit, :width] + units["bias"][unit])
        response = np.tanh(drive) if units["nonlinearity"][unit] == 0 else np.logaddexp(0.0, drive)
        response = response - response.mean()
        # With the stimulus gone the unit rests at its movie mean, so after the movie it contributes nothing.
        activity[in_movie, column] = response / max(float(response.std()), 1e-9)
    return activity


def _voxel_signal(preset, seed, mask, fine, region_of_voxel, region_kinds, units, unit_weights):
    """The noise-free response of every mask voxel per TR, its modality shares, baseline and amplitude."""
    n_voxels = region_of_voxel.size
    n_trs, movie_trs = preset.scan_trs, preset.movie_trs
    rng = _rng(seed, "signal")
    baseline = np.clip(1000.0 + 300.0 * _smooth_field(mask.shape, 3.0, rng)[mask], 500.0, 1500.0)
    percent = np.clip(1.75 + 0.5 * _smooth_field(mask.shape, 2.0, rng)[mask], 1.0, 2.5) / 100.0
    amplitude = np.where(np.array(region_kinds)[region_of_voxel] == "noise", 0.0, baseline * percent)
    signal = np.zeros((n_trs, n_voxels), dtype=np.float32)
    modality_weights = np.zeros((n_voxels, 3))
    steps_per_tr = int(round(preset.tr_s / FINE_STEP_S))
    # Pre-shifted scans: row t is the response at TR t + preshift_trs. The fine grid ends with the scan, after the
    # movie, so the P TRs past it are rest (0).
    shift = preset.preshift_trs * steps_per_tr
    middles = np.arange(n_trs) * steps_per_tr + steps_per_tr // 2 + shift
    k = preset.units_per_region
    for region, kind in enumerate(region_kinds):
        voxels = np.flatnonzero(region_of_voxel == region)
        if kind == "noise" or voxels.size == 0:
            continue
        unit_ids = region * k + np.arange(k)
        # Convolution is linear, so convolving each unit once equals convolving every voxel's mix of them.
        activity = _unit_activity(preset, fine, units, unit_ids)
        if shift:
            activity = np.concatenate([activity, np.zeros((shift, activity.shape[1]))])
        bold = convolve_hrf(activity, FINE_STEP_S, HRF_KIND)[middles]
        mix = bold @ unit_weights[voxels].T
        scale = mix[:movie_trs].std(axis=0)
        signal[:, voxels] = (mix * (amplitude[voxels] / scale)).astype(np.float32)
        for m in range(3):
            own = units["modality"][unit_ids] == m
            if own.any():
                part = bold[:movie_trs][:, own] @ unit_weights[voxels][:, own].T
                modality_weights[voxels, m] = part.var(axis=0)
        modality_weights[voxels] /= modality_weights[voxels].sum(axis=1, keepdims=True)
    return signal, modality_weights, baseline, amplitude


def _noise_levels(preset, seed, mask, region_of_voxel, region_kinds, amplitude, gains, noise_levels):
    """Shared and private noise standard deviations per voxel from a smooth target ceiling; the analytic ceiling."""
    rng = _rng(seed, "noise levels")
    target = np.clip(CEILING_MEAN + CEILING_SPREAD * _smooth_field(mask.shape, 3.0, rng)[mask], *CEILING_RANGE)
    noise_voxel = np.array(region_kinds)[region_of_voxel] == "noise"
    # Noise-only voxels get the noise a typical signal voxel with this baseline would have.
    reference = np.where(noise_voxel, np.median(amplitude[~noise_voxel]), amplitude)
    target = np.where(noise_voxel, CEILING_MEAN, target)
    mean_gain = gains.mean()
    mean_noise_variance = (mean_gain * reference) ** 2 * (1.0 / target**2 - 1.0)
    n = preset.n_subjects
    shared_std = preset.noise_scale * np.sqrt(SHARED_NOISE_FRACTION * mean_noise_variance)
    private_std = preset.noise_scale * np.sqrt((1 - SHARED_NOISE_FRACTION) * mean_noise_variance * n**2 / np.sum(noise_levels**2))
    signal_std = mean_gain * amplitude
    ceiling = signal_std / np.sqrt(signal_std**2 + shared_std**2 + private_std**2 * np.sum(noise_levels**2) / n**2)
    return shared_std, private_std, np.where(noise_voxel, 0.0, ceiling)


# --------------------------------------------------------------------------- noise and subjects


def _ar1(series: np.ndarray, phi: float) -> np.ndarray:
    """In place: unit-variance white noise (T, ...) becomes stationary unit-variance AR(1) along axis 0."""
    innovation = np.float32(math.sqrt(1.0 - phi * phi))
    for t in range(1, series.shape[0]):
        series[t] *= innovation
        series[t] += np.float32(phi) * series[t - 1]
    return series


def _smooth_noise(world: _World, rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """Spatially smooth, AR(1) noise with unit variance per voxel, written into ``out`` (T, V)."""
    n_maps = world.preset.noise_maps
    maps = np.stack([_smooth_field(world.mask.shape, 2.0, rng)[world.mask] for _ in range(n_maps)]).astype(np.float32)
    maps /= np.sqrt((maps**2).sum(axis=0, keepdims=True))
    courses = _ar1(rng.standard_normal((world.preset.scan_trs, n_maps), dtype=np.float32), NOISE_AR_PHI)
    return np.matmul(courses, maps, out=out)


def _subject_series(world: _World, subject: int, scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """Subject ``subject``'s (T, V) float32 series for the mask voxels (subjects count from 0)."""
    preset = world.preset
    shape = (preset.scan_trs, world.region_of_voxel.size)
    scratch = np.empty(shape, dtype=np.float32) if scratch is None else scratch
    data = world.signal * np.float32(world.subject_gains[subject])
    rng = _rng(world.seed, "subject baseline", subject)
    baseline = world.baseline * world.subject_baseline_scales[subject]
    baseline *= 1.0 + 0.03 * _smooth_field(world.mask.shape, 3.0, rng)[world.mask]
    data += baseline.astype(np.float32)
    # The shared noise comes from the same generator for every subject: it is one draw, seen by all.
    _smooth_noise(world, _rng(world.seed, "shared noise"), scratch)
    scratch *= world.shared_noise_std.astype(np.float32)
    data += scratch
    private_std = (world.private_noise_std * world.subject_noise_levels[subject]).astype(np.float32)
    rng = _rng(world.seed, "private noise", subject)
    _smooth_noise(world, rng, scratch)
    scratch *= private_std * np.float32(math.sqrt(SMOOTH_NOISE_FRACTION))
    data += scratch
    rng.standard_normal(dtype=np.float32, out=scratch)
    _ar1(scratch, NOISE_AR_PHI)
    scratch *= private_std * np.float32(math.sqrt(1.0 - SMOOTH_NOISE_FRACTION))
    data += scratch
    return data


def _nifti_header(world: _World, dtype: str):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    header.set_xyzt_units("mm", "sec")
    return header


def _write_subjects(folder: Path, world: _World, show: Optional[bool]) -> np.ndarray:
    """One gzipped NIfTI per subject, one subject in memory at a time; returns the empirical noise ceiling."""
    import nibabel as nib

    folder.mkdir()
    preset = world.preset
    n_trs, movie_trs = preset.scan_trs, preset.movie_trs
    size_x, size_y, size_z = preset.grid_shape
    # A (T, Z, Y, X) C-ordered volume is the (X, Y, Z, T) Fortran-ordered array NIfTI stores, with no copy.
    voxel_columns = np.ravel_multi_index(np.nonzero(world.mask), world.mask.shape, order="F")
    group_sum = np.zeros((movie_trs, world.region_of_voxel.size))
    group_count = np.zeros(movie_trs)
    scratch = np.empty((n_trs, world.region_of_voxel.size), dtype=np.float32)
    with bar("write fMRI", total=preset.n_subjects, show=show) as progress_bar:
        for subject in range(preset.n_subjects):
            data = _subject_series(world, subject, scratch)
            written = preset.subject_trs(subject)  # a short subject's file ends early
            in_mean = min(written, movie_trs)
            volume = np.zeros((written, size_z * size_y * size_x), dtype=preset.fmri_dtype)
            if preset.fmri_dtype == "int16":
                slope = np.float32(np.abs(data[:written]).max() / INT16_FULL_SCALE)
                for t in range(written):
                    volume[t, voxel_columns] = np.rint(data[t] / slope)
                for t in range(in_mean):
                    group_sum[t] += volume[t, voxel_columns] * np.float64(slope)
            else:
                slope = None
                for t in range(written):
                    volume[t, voxel_columns] = data[t]
                group_sum[:in_mean] += data[:in_mean]
            group_count[:in_mean] += 1
            del data
            header = _nifti_header(world, preset.fmri_dtype)
            image = nib.Nifti1Image(volume.reshape(written, size_z, size_y, size_x).T, world.affine, header)
            image.header.set_zooms((3.0, 3.0, 3.0, preset.tr_s))
            image.header.set_qform(world.affine, code=4)
            image.header.set_sform(world.affine, code=4)
            if slope is not None:
                image.header.set_slope_inter(float(slope), 0.0)
            nib.save(image, str(folder / FMRI_PATTERN.format(subject=subject + 1)))
            del image, volume
            progress_bar.advance(1)
    # 0 where the truth is constant (noise-only voxels).
    return pearson_r(world.signal[:movie_trs], group_sum / np.maximum(group_count, 1)[:, None])


# --------------------------------------------------------------------------- the movie


class _SpeechTrack:
    """The annotation sentences spoken by espeak-ng, each from its segment's start to at most its end."""

    def __init__(self, segments: List[Segment], sample_rate: int) -> None:
        self.executable = shutil.which("espeak-ng")
        self.segments = segments
        self.sample_rate = sample_rate
        self.next_segment = 0
        self.active: List[Tuple[int, np.ndarray]] = []  # (first sample, mono clip)
        self.spoken = 0

    def _clip(self, text: str) -> Optional[np.ndarray]:
        import soundfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "speech.wav"
            try:
                subprocess.run([self.executable, "-s", "170", "-w", str(path), text], check=True,
                               capture_output=True, timeout=60)
                samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
            except (OSError, subprocess.SubprocessError, soundfile.SoundFileError) as error:
                warnings.warn(f"espeak-ng failed ({error}); the movie has no speech from here on")
                self.executable = None
                return None
        clip = samples.mean(axis=1)
        divisor = math.gcd(self.sample_rate, rate)
        return resample_poly(clip, self.sample_rate // divisor, rate // divisor).astype(np.float32)

    def render(self, first: int, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.float32)
        if self.executable is None:
            return out
        stop = first + count
        while self.next_segment < len(self.segments):
            segment = self.segments[self.next_segment]
            if segment.start_s * self.sample_rate >= stop:
                break
            self.next_segment += 1
            clip = self._clip(segment.text)
            if clip is None:
                continue
            clip = clip[: int((segment.end_s - segment.start_s) * self.sample_rate)]
            self.active.append((int(round(segment.start_s * self.sample_rate)), clip))
            self.spoken += 1
        for start, clip in self.active:
            lo, hi = max(first, start), min(stop, start + clip.size)
            if lo < hi:
                out[lo - first:hi - first] += 0.3 * clip[lo - start:hi - start]
        self.active = [(start, clip) for start, clip in self.active if start + clip.size > stop]
        return out


def _frame_colour(brightness: float, warmth: float) -> np.ndarray:
    tint = np.array([0.12, 0.0, -0.12]) * warmth
    return np.clip(brightness + tint, 0.0, 1.0)


def _shape_colour(warmth: float) -> np.ndarray:
    return np.array([0.5 + 0.45 * warmth, 0.35, 0.5 - 0.45 * warmth])


def _write_movie(path: Path, world: _World, show: Optional[bool]) -> int:
    """H.264 + AAC, one second at a time: frames drawn from the visual features, sound from the auditory ones."""
    import av

    preset = world.preset
    width, height, fps, rate = preset.frame_width, preset.frame_height, preset.fps, preset.audio_rate
    visual, auditory = world.stimulus_visual, world.stimulus_auditory
    clock = np.arange(visual.shape[0]) / STIMULUS_CLOCK_HZ
    columns = {name: i for i, name in enumerate(VISUAL_FEATURES)}
    pixel_x = np.arange(width) + 0.5
    pixel_y = np.arange(height) + 0.5
    frame = np.empty((height, width, 3), dtype=np.uint8)
    speech = _SpeechTrack(world.segments, rate)
    phase = 0.0
    container = av.open(str(path), "w", format="mp4")
    try:
        frame_rate = Fraction(fps).limit_denominator(1001)  # 23.976 -> 2997/125
        video = container.add_stream("libx264", rate=frame_rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "23"}
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "stereo"
        audio.bit_rate = 128000
        n_seconds = int(math.ceil(preset.movie_duration_s))
        with bar("write movie", total=preset.n_frames, show=show) as progress_bar:
            for second in range(n_seconds):
                # The frames shown during this second: k / fps in [second, second + 1).
                first_frame, end_frame = math.ceil(second * frame_rate), math.ceil((second + 1) * frame_rate)
                for index in range(first_frame, min(end_frame, preset.n_frames)):
                    sample = visual[min(int(index * STIMULUS_CLOCK_HZ / frame_rate), visual.shape[0] - 1)]
                    frame[:] = np.round(255 * _frame_colour(sample[columns["brightness"]],
                                                            sample[columns["background_warmth"]])).astype(np.uint8)
                    radius = sample[columns["shape_size"]] * height
                    centre_x, centre_y = sample[columns["shape_x"]] * width, sample[columns["shape_y"]] * height
                    x0, x1 = max(0, int(centre_x - radius)), min(width, int(centre_x + radius) + 1)
                    y0, y1 = max(0, int(centre_y - radius)), min(height, int(centre_y + radius) + 1)
                    if x0 < x1 and y0 < y1:
                        squared = (pixel_x[None, x0:x1] - centre_x) ** 2 + (pixel_y[y0:y1, None] - centre_y) ** 2
                        inside = squared <= radius**2
                        colour = np.round(255 * _shape_colour(sample[columns["shape_warmth"]])).astype(np.uint8)
                        frame[y0:y1, x0:x1][inside] = colour
                    video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                    video_frame.pts = index
                    video_frame.time_base = 1 / frame_rate
                    for packet in video.encode(video_frame):
                        container.mux(packet)
                    progress_bar.advance(1)
                first = second * rate
                count = min(rate, preset.n_audio_samples - first)
                if count <= 0:
                    continue
                sound, phase = _render_audio(world, clock, auditory, first, count, phase, rate)
                sound += speech.render(first, count)
                np.clip(sound, -0.99, 0.99, out=sound)
                audio_frame = av.AudioFrame.from_ndarray(np.stack([sound, sound]), format="fltp", layout="stereo")
                audio_frame.sample_rate = rate
                audio_frame.pts = first
                audio_frame.time_base = Fraction(1, rate)
                for packet in audio.encode(audio_frame):
                    container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)
    finally:
        container.close()
    return speech.spoken


def _render_audio(world: _World, clock: np.ndarray, auditory: np.ndarray, first: int, count: int,
                  phase: float, rate: int) -> Tuple[np.ndarray, float]:
    """Samples ``first .. first + count`` of the mono soundtrack (tone + noise bursts) and the tone's phase after."""
    times = (first + np.arange(count)) / rate
    pitch = np.interp(times, clock, auditory[:, AUDITORY_FEATURES.index("tone_pitch")])
    loudness = np.interp(times, clock, auditory[:, AUDITORY_FEATURES.index("tone_loudness")])
    phases = phase + 2 * np.pi * np.cumsum(2.0**pitch) / rate
    sound = loudness * (np.sin(phases) + 0.3 * np.sin(2 * phases)) / 1.3
    burst_samples = int(round(BURST_S * rate))
    envelope = np.hanning(burst_samples + 2)[1:-1]
    noise = _rng(world.seed, "burst noise", first // rate).standard_normal(count)
    onsets = world.burst_onsets_s
    start_s, stop_s = first / rate, (first + count) / rate
    for burst in np.flatnonzero((onsets < stop_s) & (onsets + BURST_S > start_s)):
        onset = int(round(onsets[burst] * rate))
        lo, hi = max(first, onset), min(first + count, onset + burst_samples)
        shaped = world.burst_amplitudes[burst] * envelope[lo - onset:hi - onset]
        sound[lo - first:hi - first] += shaped * noise[lo - first:hi - first]
    return sound.astype(np.float32), float(np.mod(phases[-1], 2 * np.pi))


def _write_annotations(path: Path, segments: List[Segment], preset: Optional[SynthPreset] = None) -> None:
    from openpyxl import Workbook

    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "Sheet1"
    if preset is not None and preset.sherlock_workbook:
        sheet.append(list(SHERLOCK_ANNOTATION_COLUMNS))
        for number, segment in enumerate(segments, start=1):
            first, last = int(segment.start_s // preset.tr_s) + 1, int(segment.end_s // preset.tr_s) + 1
            names = segment.names.split(", ")
            sheet.append([number, segment.start_s, segment.end_s, first, last, None, segment.text,
                          "Indoor" if segment.location in ("kitchen", "hospital", "library") else "Outdoor",
                          segment.names, names[0], names[-1] if number % 3 else None, segment.location,
                          segment.camera_angle, "No", None])
    else:
        sheet.append(list(ANNOTATION_COLUMNS))
        for segment in segments:
            sheet.append([segment.start_s, segment.end_s, segment.text, segment.names, segment.location,
                          segment.camera_angle])
    workbook.save(str(path))


# --------------------------------------------------------------------------- the truth


def _write_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=4)
    image.header.set_sform(affine, code=4)
    nib.save(image, str(path))


def _write_labels(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """An int32 label image with the same header as the masks."""
    import nibabel as nib

    image = nib.Nifti1Image(labels.astype(np.int32), affine)
    image.set_data_dtype(np.int32)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=4)
    image.header.set_sform(affine, code=4)
    nib.save(image, str(path))


def _write_brain_truth(folder: Path, world: _World) -> None:
    """signal.npy, features.npz, tuning.npz, the region masks and the regions' label image."""
    preset = world.preset
    np.save(folder / "signal.npy", world.signal)
    steps_per_tr = int(round(preset.tr_s / FINE_STEP_S))
    n_fine = world.fine_features["visual"].shape[0]

    def per_tr(fine: np.ndarray) -> np.ndarray:
        """Mean over each TR's window [t * TR, (t + 1) * TR)."""
        return fine.reshape(preset.scan_trs, steps_per_tr, -1).mean(axis=1)

    np.savez_compressed(
        folder / "features.npz",
        fine_step_s=FINE_STEP_S,
        fine_times_s=np.arange(n_fine) * FINE_STEP_S,
        in_movie_fine=world.fine_features["in_movie"],
        in_movie_tr=np.arange(preset.scan_trs) < preset.movie_trs,
        visual_names=np.array(VISUAL_FEATURES),
        auditory_names=np.array(AUDITORY_FEATURES),
        language_names=np.array(LANGUAGE_FEATURES),
        **{f"{m}_fine": world.fine_features[m].astype(np.float32) for m in MODALITIES},
        **{f"{m}_tr": per_tr(world.fine_features[m]).astype(np.float32) for m in MODALITIES},
        scene_starts_s=world.scene_starts,
        segment_starts_s=np.array([s.start_s for s in world.segments]),
        segment_ends_s=np.array([s.end_s for s in world.segments]),
        burst_onsets_s=world.burst_onsets_s,
    )
    units = world.units
    np.savez_compressed(
        folder / "tuning.npz",
        region_id=world.region_of_voxel,
        region_kind=np.array(world.region_kinds)[world.region_of_voxel],
        modality_names=np.array(MODALITIES),
        modality_weights=world.modality_weights.astype(np.float32),
        voxel_ijk=np.argwhere(world.mask).astype(np.int16),
        amplitude=world.amplitude.astype(np.float32),
        baseline=world.baseline.astype(np.float32),
        shared_noise_std=world.shared_noise_std.astype(np.float32),
        private_noise_std=world.private_noise_std.astype(np.float32),
        unit_weights=world.unit_weights.astype(np.float32),
        unit_modality=units["modality"],
        unit_projection=units["projection"].astype(np.float32),
        unit_bias=units["bias"],
        unit_slope=units["slope"],
        unit_nonlinearity=np.array(["tanh", "softplus"])[units["nonlinearity"]],
    )
    kinds = np.array(world.region_kinds)[world.region_of_voxel]
    for kind, name in (("visual", "region_visual"), ("auditory", "region_auditory"), ("language", "region_language"),
                       ("mixed", "region_mixed"), ("noise", "noise_only")):
        region_mask = np.zeros(world.mask.shape, dtype=bool)
        region_mask[world.mask] = kinds == kind
        _write_mask(folder / f"{name}.nii.gz", region_mask, world.affine)
    _write_mask(folder / "brain_mask.nii.gz", world.mask, world.affine)
    regions = np.zeros(world.mask.shape, dtype=np.int32)
    regions[world.mask] = world.region_of_voxel + 1  # label = region id + 1; 0 outside every region
    _write_labels(folder / "regions.nii.gz", regions, world.affine)
    np.save(folder / "noise_ceiling.npy", world.noise_ceiling.astype(np.float32))


def _description(preset: SynthPreset) -> str:
    return (
        "Scenes of 3-15 s set latent visual (background brightness and tint, a bouncing disk's colour, size, position "
        "and speed), auditory (tone pitch and loudness, noise-burst energy) and language (characters, location, topic "
        "of each annotation sentence) features. Each signal region's neural units are tanh/softplus functions of a "
        "sparse random projection of one modality's standardized features (several modalities in mixed regions); a "
        "voxel mixes its region's units with spatially smooth weights, is convolved with the causal Glover HRF "
        f"(peak ~5.2 s) on a {FINE_STEP_S} s grid and sampled at the middle of each {preset.tr_s} s TR. Subject data = "
        "baseline (500-1500) + gain x signal + noise shared by all subjects + private noise (smooth + white, AR(1)); "
        "noise-only voxels carry no signal, and voxels outside the mask are 0."
    )


def _write_summary(folder: Path, world: _World, empirical: np.ndarray, spoken_segments: int, seconds: float) -> None:
    """noise_ceiling_empirical.npy, tuning.json and truth.json."""
    preset = world.preset
    np.save(folder / "noise_ceiling_empirical.npy", empirical.astype(np.float32))
    kinds = np.array(world.region_kinds)[world.region_of_voxel]
    k = preset.units_per_region
    regions = []
    for region, kind in enumerate(world.region_kinds):
        voxels = world.region_of_voxel == region
        unit_modalities = world.units["modality"][region * k:(region + 1) * k]
        regions.append({
            "id": region,
            "kind": kind,
            "modalities": sorted({MODALITIES[m] for m in unit_modalities if m >= 0}),
            "n_voxels": int(voxels.sum()),
            "mean_modality_weights": dict(zip(MODALITIES, world.modality_weights[voxels].mean(0).round(4).tolist())),
            "mean_noise_ceiling": round(float(world.noise_ceiling[voxels].mean()), 4),
            "mean_noise_ceiling_empirical": round(float(empirical[voxels].mean()), 4),
        })
    tuning = {
        "regions": regions,
        "units_per_region": k,
        "subject_gains": world.subject_gains.round(4).tolist(),
        "subject_noise_levels": world.subject_noise_levels.round(4).tolist(),
        "per_voxel_arrays": "tuning.npz (voxels in the C order of the brain mask)",
    }
    (folder / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
    counts = {kind: int((kinds == kind).sum()) for kind in REGION_KINDS}
    ceilings = {kind: round(float(world.noise_ceiling[kinds == kind].mean()), 4)
                for kind in REGION_KINDS[:4] if counts[kind]}
    signal_voxels = kinds != "noise"
    truth = {
        "preset": preset.name,
        "preset_sizes": asdict(preset),
        "seed": world.seed,
        "tr_s": preset.tr_s,
        "n_trs": preset.scan_trs,
        "movie_trs": preset.movie_trs,
        "fps": preset.fps,
        "audio_rate": preset.audio_rate,
        "frame_size": [preset.frame_width, preset.frame_height],
        "movie_duration_s": preset.movie_duration_s,
        "n_frames": preset.n_frames,
        "n_subjects": preset.n_subjects,
        "grid_shape": list(preset.grid_shape),
        "affine": world.affine.tolist(),
        "n_mask_voxels": int(world.mask.sum()),
        "voxel_counts": counts,
        "region_labels": {str(region + 1): kind for region, kind in enumerate(world.region_kinds)},
        "mean_noise_ceiling": ceilings,
        "mean_noise_ceiling_signal_voxels": round(float(world.noise_ceiling[signal_voxels].mean()), 4),
        "mean_noise_ceiling_empirical_signal_voxels": round(float(empirical[signal_voxels].mean()), 4),
        "n_scenes": int(world.scene_starts.size),
        "n_annotation_segments": len(world.segments),
        "hrf": HRF_KIND,
        "fine_step_s": FINE_STEP_S,
        "signal_sampled_at": ("middle of each TR, (t + 0.5) * tr_s" if not preset.preshift_trs else
                              f"middle of TR t + {preset.preshift_trs}, (t + {preset.preshift_trs} + 0.5) * tr_s "
                              f"(the fMRI written shifted earlier by {preset.preshift_trs} TRs)"),
        "preshift_trs": preset.preshift_trs,
        "subject_trs": [preset.subject_trs(s) for s in range(preset.n_subjects)],
        "spoken_segments": spoken_segments,
        "synthesis_seconds": round(seconds, 2),
        "description": _description(preset),
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
