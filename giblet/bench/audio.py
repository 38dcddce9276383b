"""How well and how fast a store's mel turns back into sound (``giblet bench --case mel_inversion``).

The round trip: a synthetic clip -> its log-mel as a store makes it (``giblet.data.audio.mel_spectrogram``) -> sound
(``giblet.eval.lesion.mel_to_sound``, the path behind the lesion report's ``audio_*.wav``) -> the log-mel of that
sound. The score is the spectral convergence ``||g R - M||_F / ||M||_F`` on mel magnitudes (the square root of mel
power), ``M`` the clip's and ``R`` the rebuilt sound's, with ``g`` the least-squares gain: the written files are
peak-normalised, so their level is not part of what a rebuild keeps. Both mels are taken at the rebuilt sound's rate
(the clip resampled to it when the rebuild halves the rate). 0 is a perfect rebuild; silence and white noise score
about 0.95 on the default clip.
"""

from __future__ import annotations

import time
from math import gcd
from typing import Dict, List

import numpy as np

from giblet.data.audio import MEL_RATE_HZ, mel_hop, mel_spectrogram


def synthetic_clip(rate: int = 44100, seconds: float = 20.0, seed: int = 0) -> np.ndarray:
    """Mono float32: a tone with two overtones gliding between about 90 Hz and 1 kHz, its loudness swelling, plus one
    Hann-shaped burst of white noise (250 ms) per second on average, at random onsets."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    pitch = 8.0 + 1.5 * np.sin(2 * np.pi * t / 7.0) + 0.5 * np.sin(2 * np.pi * t / 2.3)  # log2 of the frequency in Hz
    loudness = 0.3 + 0.2 * np.sin(2 * np.pi * t / 3.1) ** 2
    phase = 2 * np.pi * np.cumsum(2.0**pitch) / rate
    sound = loudness * (np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.15 * np.sin(3 * phase)) / 1.45
    burst = int(round(0.25 * rate))
    envelope = np.hanning(burst + 2)[1:-1]
    for onset in rng.uniform(0.0, max(seconds - 0.25, 0.0), int(seconds)):
        first = int(onset * rate)
        piece = sound[first : first + burst]
        piece += 0.3 * envelope[: piece.size] * rng.standard_normal(piece.size)
    return sound.astype(np.float32)


def mel_magnitude(samples: np.ndarray, rate: int, n_mels: int = 64) -> np.ndarray:
    """``(T, n_mels)`` square root of the mel power, framed as a store frames it."""
    decibels, _ = mel_spectrogram(np.asarray(samples, dtype=np.float32), rate, n_mels=n_mels, frame_rate_hz=MEL_RATE_HZ)
    return 10.0 ** (decibels.astype(np.float64) / 20.0)


def spectral_convergence(rebuilt: np.ndarray, reference: np.ndarray) -> float:
    """``||g R - M||_F / ||M||_F`` over the frames both have, ``g`` the least-squares gain of ``R`` onto ``M``."""
    n = min(len(rebuilt), len(reference))
    r, m = rebuilt[:n], reference[:n]
    gain = float((r * m).sum() / max(float((r * r).sum()), 1e-300))
    return float(np.linalg.norm(gain * r - m) / np.linalg.norm(m))


def round_trip(samples: np.ndarray, rate: int, n_mels: int = 64) -> Dict[str, object]:
    """The clip's spectral convergence through the lesion report's mel-to-sound path, and its seconds."""
    from scipy.signal import resample_poly

    from giblet.eval.lesion import mel_to_sound

    decibels, _ = mel_spectrogram(samples, rate, n_mels=n_mels, frame_rate_hz=MEL_RATE_HZ)
    decibels = decibels.astype(np.float16).astype(np.float32)  # a store keeps the mel as float16
    started = time.perf_counter()
    sound, sound_rate = mel_to_sound(decibels, rate, mel_hop(rate, MEL_RATE_HZ))
    seconds = time.perf_counter() - started
    divisor = gcd(sound_rate, rate)
    heard = samples if sound_rate == rate else resample_poly(samples, sound_rate // divisor, rate // divisor)
    reference = mel_magnitude(heard, sound_rate, n_mels)
    return {"spectral_convergence": spectral_convergence(mel_magnitude(sound, sound_rate, n_mels), reference),
            "seconds": seconds, "sound_rate": int(sound_rate), "reference": reference}


def mel_inversion(rate: int = 44100, seconds: float = 20.0, n_mels: int = 64, repeats: int = 3,
                  seed: int = 0) -> Dict[str, object]:
    """Spectral convergence of the round trip on ``synthetic_clip`` (the same every call: the rebuild is seeded), the
    median seconds of ``repeats`` rebuilds, and what silence and white noise of the same length score."""
    clip = synthetic_clip(rate, seconds, seed)
    times: List[float] = []
    for _ in range(repeats):
        result = round_trip(clip, rate, n_mels)
        times.append(float(result["seconds"]))
    sound_rate, reference = int(result["sound_rate"]), result["reference"]
    n = reference.shape[0] * mel_hop(sound_rate, MEL_RATE_HZ)
    noise = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
    return {
        "rate": rate, "clip_seconds": seconds, "n_mels": n_mels, "sound_rate": sound_rate, "repeats": repeats,
        "spectral_convergence": result["spectral_convergence"],
        "median_s": float(np.median(times)), "min_s": float(min(times)),
        "silence_spectral_convergence": spectral_convergence(mel_magnitude(np.zeros(n, np.float32), sound_rate, n_mels), reference),
        "noise_spectral_convergence": spectral_convergence(mel_magnitude(noise, sound_rate, n_mels), reference),
    }
