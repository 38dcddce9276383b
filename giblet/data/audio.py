"""Soundtrack decoding, log-mel frames and EnCodec codes.

Times share the origin of ``giblet.data.video``: the video stream start.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import av
import librosa
import numpy as np
import torch

from giblet.data.video import _open_container, _start_pts, _video_start_s
from giblet.errors import DataError
from giblet.progress import bar

PathLike = Union[str, Path]

CODEBOOK_KBPS = 0.75  # each EnCodec codebook carries 750 bps at 75 Hz (10 bits per code frame)
CODEBOOK_SIZE = 1024
PRETRAINED_MODELS = ("encodec_24khz", "encodec_48khz")
_BANDWIDTHS = {"encodec_24khz": (1.5, 3.0, 6.0, 12.0, 24.0), "encodec_48khz": (3.0, 6.0, 12.0, 24.0)}

NO_AUDIO_FIX = "add the soundtrack, or set audio.features: [] to train without audio"


def read_audio(path: PathLike, progress: bool = True) -> Tuple[np.ndarray, int, float]:
    """Mono float32 samples (channel mean) at the codec's own rate, the rate, and start_s.

    ``start_s`` is the time of the first sample relative to the video stream start
    (0.0 when the file has no video).
    """
    with _open_container(path) as container:
        if not container.streams.audio:
            raise DataError(
                path,
                "the movie has no audio track",
                expected="an audio stream (e.g. AAC)",
                fix=NO_AUDIO_FIX,
            )
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or 0)
        if rate <= 0:
            raise DataError(path, f"audio sample rate is {rate}", expected="a positive sample rate (e.g. 44100)")
        origin = _video_start_s(container)
        stream_start = _start_pts(stream, container)
        duration = stream.duration * stream.time_base if stream.duration and stream.time_base else None
        pieces = []
        first_time = None
        # converts every sample format to float planes; channels are averaged below, not by swresample's mix matrix
        resampler = None
        resampler_layout = None
        with bar("decode audio", total=float(duration) if duration else None, show=None if progress else False) as b:
            try:
                for frame in container.decode(stream):
                    if first_time is None:
                        first_time = frame.pts * stream.time_base if frame.pts is not None else stream_start
                    if frame.sample_rate != rate:
                        raise DataError(
                            path,
                            f"audio sample rate changes from {rate} Hz to {frame.sample_rate} Hz mid-stream",
                            expected="one sample rate for the whole track",
                            fix="re-encode the soundtrack with ffmpeg -i IN -c:v copy -c:a aac -ar 44100 OUT.mp4",
                        )
                    if resampler is None or resampler_layout != frame.layout.name:
                        resampler_layout = frame.layout.name
                        resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                    for converted in resampler.resample(frame):
                        pieces.append(converted.to_ndarray().mean(axis=0, dtype=np.float32))
                    b.advance(frame.samples / rate)
                if resampler is not None:
                    for converted in resampler.resample(None):
                        pieces.append(converted.to_ndarray().mean(axis=0, dtype=np.float32))
            except av.error.FFmpegError as err:
                raise DataError(
                    path,
                    f"audio decoding failed ({err})",
                    expected="a complete, undamaged audio stream",
                    fix="re-encode the soundtrack with ffmpeg -i IN -c:v copy -c:a aac OUT.mp4",
                ) from err
    if not pieces:
        raise DataError(path, "audio stream decoded to 0 samples", expected="a non-empty soundtrack", fix=NO_AUDIO_FIX)
    samples = np.concatenate(pieces).astype(np.float32, copy=False)
    return samples, rate, float(first_time - origin)


MEL_RATE_HZ = 50.0  # mel frames per second in a store: 20 ms hops, finer than any window slot


def mel_spectrogram(
    samples: np.ndarray,
    rate: int,
    n_mels: int = 64,
    frame_rate_hz: float = 50.0,
    fmax: Optional[float] = None,
    chunk_frames: int = 4096,
) -> Tuple[np.ndarray, float]:
    """Log-mel frames ``float32 (T, n_mels)`` and their exact rate ``rate / hop``.

    ``hop = round(rate / frame_rate_hz)``. Frames are not centred (librosa's
    ``center=False`` convention): frame t is a Hann-windowed slice of exactly samples
    ``[t * hop, (t + 1) * hop)``, i.e. it covers ``[t, t + 1) / frame_rate``; the FFT
    zero-pads it to at least twice its length so narrow low mel bands are not empty.
    ``T = len(samples) // hop`` (a trailing partial frame is dropped). Values are
    ``10 * log10(max(mel power, 1e-10))``, with no per-file normalisation, so chunks agree.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono (1-D), got shape {samples.shape}")
    if not rate > 0 or not frame_rate_hz > 0:
        raise ValueError(f"rate and frame_rate_hz must be positive, got {rate} and {frame_rate_hz}")
    hop = mel_hop(rate, frame_rate_hz)
    if hop < 2:
        raise ValueError(f"frame_rate_hz={frame_rate_hz} is too high for {rate} Hz audio (hop of {hop} samples)")
    nyquist = rate / 2
    if fmax is not None and not 0 < fmax <= nyquist:
        raise ValueError(f"fmax must be in (0, {nyquist}] for {rate} Hz audio, got {fmax}")
    n_fft = 1 << (2 * hop - 1).bit_length()
    window = librosa.filters.get_window("hann", hop, fftbins=True).astype(np.float32)
    filters = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmax=fmax).astype(np.float32).T
    n_frames = samples.size // hop
    out = np.empty((n_frames, n_mels), np.float32)
    # chunks of frames keep the power spectrogram of a 24-minute 44.1 kHz track out of memory
    for start in range(0, n_frames, chunk_frames):
        stop = min(start + chunk_frames, n_frames)
        frames = samples[start * hop : stop * hop].astype(np.float32).reshape(stop - start, hop) * window
        power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
        out[start:stop] = librosa.power_to_db(power.astype(np.float32) @ filters, ref=1.0, amin=1e-10, top_db=None)
    return out, rate / hop


def n_codebooks(bandwidth_kbps: float, model: str = "encodec_24khz") -> int:
    """Codebooks EnCodec uses at ``bandwidth_kbps`` (24 kHz model: 1.5 -> 2 ... 24 -> 32).

    The 48 kHz model runs at 150 Hz, so each of its codebooks carries twice the bitrate.
    """
    if model not in _BANDWIDTHS:
        raise ValueError(f"unknown EnCodec model {model!r}; expected one of {', '.join(PRETRAINED_MODELS)}")
    valid = _BANDWIDTHS[model]
    if bandwidth_kbps not in valid:
        raise ValueError(
            f"EnCodec bandwidth {bandwidth_kbps!r} kbps is not supported by {model}; "
            f"expected one of {', '.join(f'{v:g}' for v in valid)}"
        )
    per_codebook = CODEBOOK_KBPS * (2 if model == "encodec_48khz" else 1)
    return int(round(bandwidth_kbps / per_codebook))


def architecture(model) -> str:
    """``encodec_24khz`` or ``encodec_48khz``: the architecture of a loaded model."""
    return "encodec_48khz" if model.sample_rate == 48_000 else "encodec_24khz"


def named_architecture(model_name: str) -> str:
    """The architecture named by ``audio.encodec_model``; checkpoints and "random" are taken as 24 kHz."""
    return "encodec_48khz" if model_name == "encodec_48khz" else "encodec_24khz"


def code_rate_hz(model_name: str) -> float:
    """Code frames per second of the model named by ``audio.encodec_model``."""
    return 150.0 if named_architecture(model_name) == "encodec_48khz" else 75.0


def mel_hop(rate: int, frame_rate_hz: float) -> int:
    """Samples per mel frame: the frame rate is exactly ``rate / mel_hop(rate, frame_rate_hz)``."""
    return int(round(rate / frame_rate_hz))


@contextmanager
def _quiet_weight_norm() -> Iterator[None]:
    # the encodec package builds its layers with the deprecated torch weight_norm
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        yield


def _fill_codebooks(model, seed: int) -> None:
    """Give every quantizer layer random codebook entries on the scale of its input.

    Codebooks start at zero and are normally filled by k-means on training data; left
    empty, every code is 0, and plain N(0, 1) entries dwarf the random encoder's small,
    nearly constant output, so every code is the same again. Each layer's entries are
    instead Gaussian with the per-dimension mean and spread of that layer's residuals on
    seeded noise bursts (40 dB of loudness range).
    """
    generator = torch.Generator().manual_seed(seed)
    rate, hop = model.sample_rate, model.sample_rate // model.frame_rate
    n_blocks = 20
    block = rate // 5
    loudness = 10 ** (-2 * torch.rand(n_blocks, 1, generator=generator))
    noise = torch.randn(n_blocks, block, generator=generator) * loudness
    with torch.no_grad():
        residual = model.encoder(noise.reshape(1, model.channels, -1))[0].T  # (n_frames, dim)
        assert residual.shape[0] == math.ceil(n_blocks * block / hop)
        for layer in model.quantizer.vq.layers:
            codebook = layer._codebook
            draws = torch.randn(codebook.embed.shape, generator=generator)
            embed = residual.mean(dim=0) + residual.std(dim=0) * draws
            codebook.embed.data.copy_(embed)
            codebook.embed_avg.data.copy_(embed)
            codebook.inited.data.fill_(1)
            residual = residual - embed[torch.cdist(residual, embed).argmin(dim=1)]


def load_encodec(model: Union[str, Path] = "encodec_24khz", bandwidth: float = 6.0, seed: int = 0):
    """An EnCodec model in eval mode with its target bandwidth set.

    ``model`` is ``"encodec_24khz"`` / ``"encodec_48khz"`` (pretrained weights, downloaded by
    the encodec package), a path to a local ``state_dict`` checkpoint (24 kHz or 48 kHz
    architecture), or ``"random"``: the 24 kHz architecture with random weights and random
    codebooks seeded by ``seed``. ``"random"`` codes carry no meaning; use it only for tests
    and offline demos.
    """
    from encodec import EncodecModel

    model_name = str(model)
    if model_name in PRETRAINED_MODELS:
        build = EncodecModel.encodec_model_24khz if model_name == "encodec_24khz" else EncodecModel.encodec_model_48khz
        try:
            with _quiet_weight_norm():
                net = build(pretrained=True)
        except Exception as err:
            raise DataError(
                model_name,
                f"pretrained EnCodec weights could not be downloaded ({type(err).__name__}: {err})",
                expected="internet access, or a local checkpoint path in audio.encodec_model",
                fix="download the checkpoint on a machine with internet and set audio.encodec_model to its local path",
            ) from err
    elif model_name == "random":
        with torch.random.fork_rng(devices=[]), _quiet_weight_norm():
            torch.manual_seed(seed)
            net = EncodecModel.encodec_model_24khz(pretrained=False)
        _fill_codebooks(net, seed)
    else:
        net = _load_checkpoint(Path(model_name), EncodecModel)
    try:
        net.set_target_bandwidth(float(bandwidth))
    except ValueError:
        n_codebooks(float(bandwidth), architecture(net))  # raises, naming the valid bandwidths
        raise
    return net.eval()


def _load_checkpoint(path: Path, EncodecModel):
    expected = "an EnCodec state_dict saved with torch.save, or one of encodec_24khz, encodec_48khz, random"
    if not path.is_file():
        raise DataError(
            path,
            "EnCodec checkpoint not found",
            expected=expected,
            fix="set audio.encodec_model to an existing checkpoint file",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(path, f"cannot be loaded as a torch checkpoint ({err})", expected=expected) from err
    if not isinstance(state, dict):
        raise DataError(path, f"holds a {type(state).__name__}", expected=expected)
    errors = []
    for build in (EncodecModel.encodec_model_24khz, EncodecModel.encodec_model_48khz):
        with _quiet_weight_norm():
            net = build(pretrained=False)
        try:
            net.load_state_dict(state)
            return net
        except RuntimeError as err:
            errors.append(str(err).splitlines()[0])
    raise DataError(
        path,
        f"state_dict does not match the 24 kHz or 48 kHz EnCodec architecture ({errors[0]})",
        expected=expected,
    )


def encode_codes(samples: np.ndarray, rate: int, model, chunk_s: float = 30.0, progress: bool = True) -> np.ndarray:
    """EnCodec codes ``int16 (n_codebooks, T)`` with ``T = ceil(n / hop)`` for the resampled signal.

    Chunks are whole multiples of the code hop, so chunking never changes T; each chunk
    is encoded without context from its neighbours.
    """
    samples = np.asarray(samples, np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"samples must be non-empty mono (1-D), got shape {samples.shape}")
    if not chunk_s > 0:
        raise ValueError(f"chunk_s must be positive, got {chunk_s}")
    target_rate = int(model.sample_rate)
    if int(rate) != target_rate:
        samples = librosa.resample(samples, orig_sr=int(rate), target_sr=target_rate, res_type="soxr_hq")
    hop = target_rate // int(model.frame_rate)
    chunk = max(1, int(round(chunk_s * target_rate / hop))) * hop
    if model.segment_length is not None:
        # models trained on fixed segments (48 kHz: 1 s) must not see longer inputs
        chunk = min(chunk, (model.segment_length // hop) * hop)
    if model.bandwidth is None:
        raise ValueError("the EnCodec model has no target bandwidth: load it with load_encodec(..., bandwidth=...)")
    n_q = n_codebooks(float(model.bandwidth), architecture(model))
    n_total = int(math.ceil(samples.size / hop))
    device = next(model.parameters()).device
    pieces = []
    with torch.no_grad(), bar("encode audio", total=samples.size / target_rate, show=None if progress else False) as b:
        for start in range(0, samples.size, chunk):
            piece = samples[start : start + chunk]
            x = torch.from_numpy(np.ascontiguousarray(piece)).to(device).view(1, 1, -1)
            if model.channels == 2:
                x = x.expand(1, 2, -1)
            # one frame per chunk (model.encode would split 48 kHz input into overlapping 1 s segments)
            codes, _scale = model._encode_frame(x)
            expected_shape = (1, n_q, int(math.ceil(piece.size / hop)))
            assert tuple(codes.shape) == expected_shape, f"EnCodec returned {tuple(codes.shape)}, expected {expected_shape}"
            pieces.append(codes[0].cpu().numpy().astype(np.int16))
            b.advance(piece.size / target_rate)
    codes = np.concatenate(pieces, axis=1)
    assert codes.shape == (n_q, n_total), f"codes shape {codes.shape}, expected {(n_q, n_total)}"
    return codes


def check_codes(codes: np.ndarray, n_q: int, source) -> np.ndarray:
    """Validate codes from elsewhere: integer ``(n_q, T)`` in ``[0, 1024)``; returns them as int16."""
    codes = np.asarray(codes)
    expected_shape = f"(n_codebooks, n_frames) = ({n_q}, T)"
    if codes.ndim == 3 and codes.shape[0] == 1:
        raise DataError(
            source,
            f"EnCodec codes have shape {codes.shape}, with a batch axis",
            expected=expected_shape,
            fix="drop the batch axis with codes[0]",
        )
    if codes.ndim != 2:
        raise DataError(source, f"EnCodec codes have shape {codes.shape}", expected=expected_shape)
    if codes.shape[0] != n_q:
        raise DataError(
            source,
            f"EnCodec codes have {codes.shape[0]} codebooks (shape {codes.shape})",
            expected=f"{expected_shape}; n_codebooks follows the EnCodec bandwidth",
            fix="encode with the configured bandwidth, or transpose codes stored as (n_frames, n_codebooks)",
        )
    if codes.shape[1] == 0:
        raise DataError(
            source, f"EnCodec codes have shape {codes.shape}, with no frames", expected=f"{expected_shape} with T >= 1"
        )
    if not np.issubdtype(codes.dtype, np.integer):
        raise DataError(source, f"EnCodec codes have dtype {codes.dtype}", expected="integer codebook indices (e.g. int16)")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= CODEBOOK_SIZE:
        raise DataError(
            source,
            f"EnCodec codes range over [{low}, {high}]",
            expected=f"codebook indices in [0, {CODEBOOK_SIZE - 1}]",
        )
    return codes.astype(np.int16)
