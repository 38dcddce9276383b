"""Soundtrack decoding, log-mel frames and EnCodec codes (random or local weights: no internet here)."""

import math
import urllib.error
from fractions import Fraction

import av
import librosa
import numpy as np
import pytest
import torch

from giblet.data.audio import (
    CODEBOOK_KBPS,
    check_codes,
    encode_codes,
    load_encodec,
    mel_spectrogram,
    n_codebooks,
    read_audio,
)
from giblet.errors import DataError
from media import encode_stereo, write_mono_wav


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # these convolutions are tiny: on a busy 2-core machine, OpenMP threads only wait for each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_movie(path, seconds=1.0, left=0.6, right=0.2, pitch_hz=1000.0, audio_offset_s=0.0, video_offset_s=0.0, audio=True):
    """Tiny H.264 movie with a stereo AAC sine (``left``/``right`` amplitudes) starting at ``audio_offset_s``."""
    rate = 44100
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=Fraction(25))
    video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
    video.options = {"preset": "ultrafast"}
    sound = container.add_stream("aac", rate=rate, layout="stereo") if audio else None
    for i in range(int(25 * seconds)):
        frame = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
        frame.pts = i + round(video_offset_s * 25)
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if sound is not None:
        n = int(rate * seconds)
        wave = np.sin(2 * np.pi * pitch_hz * np.arange(n) / rate).astype(np.float32)
        encode_stereo(container, sound, np.stack([left * wave, right * wave]), rate, round(audio_offset_s * rate))
    container.close()
    return path


def sine(pitch_hz, rate, seconds, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * pitch_hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


# --- decoding ---------------------------------------------------------------------------------------


def test_read_audio_rate_length_start_and_channel_mean(tmp_path):
    samples, rate, start_s = read_audio(write_movie(tmp_path / "m.mp4", seconds=2.0), progress=False)
    assert rate == 44100 and start_s == 0.0
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert 2 * 44100 <= len(samples) <= 2 * 44100 + 2048  # AAC pads the last 1024-sample frame
    rms = np.sqrt(np.mean(samples[4410:-4410] ** 2))
    # channel mean of 0.6 and 0.2 amplitudes; swresample's stereo downmix (0.707 each) would give 0.566
    assert rms == pytest.approx(0.4 / math.sqrt(2), rel=0.05)


def test_audio_start_is_relative_to_video_start(tmp_path):
    late = write_movie(tmp_path / "late.mp4", audio_offset_s=0.5)
    samples, rate, start_s = read_audio(late, progress=False)
    onset = int(np.argmax(np.abs(samples) > 0.05))
    assert start_s + onset / rate == pytest.approx(0.5, abs=0.003)

    _, _, start_s = read_audio(write_movie(tmp_path / "late_video.mp4", video_offset_s=0.2), progress=False)
    assert start_s == pytest.approx(-0.2, abs=1e-6)


def test_audio_only_file_starts_at_zero(tmp_path):
    path = tmp_path / "sound.wav"
    values = (np.arange(800) * 40 - 16000).astype(np.int16)
    write_mono_wav(path, values, 8000)
    samples, rate, start_s = read_audio(path, progress=False)
    assert (rate, start_s) == (8000, 0.0)
    np.testing.assert_allclose(samples, values / 32768.0, atol=1e-6)


def test_movie_without_audio_names_file_and_fix(tmp_path):
    path = write_movie(tmp_path / "silent_film.mp4", audio=False)
    with pytest.raises(DataError) as caught:
        read_audio(path, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{path}: the movie has no audio track")
    assert "expected an audio stream (e.g. AAC)" in message
    assert "audio.features: []" in message


def test_missing_audio_file(tmp_path):
    with pytest.raises(DataError, match="nothing.m4v: file not found"):
        read_audio(tmp_path / "nothing.m4v", progress=False)


# --- mel ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pitch_hz", [440.0, 1000.0, 3000.0])
def test_sine_energy_lands_in_its_mel_band(pitch_hz):
    rate, n_mels = 16000, 64
    mel, frame_rate = mel_spectrogram(sine(pitch_hz, rate, 1.0), rate, n_mels=n_mels)
    assert mel.dtype == np.float32 and mel.shape == (50, n_mels)
    centres = librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=rate / 2)[1:-1]
    loudest = np.bincount(mel.argmax(axis=1), minlength=n_mels).argmax()
    assert abs(loudest - np.abs(centres - pitch_hz).argmin()) <= 1


def test_mel_frame_rate_is_exact():
    mel, frame_rate = mel_spectrogram(np.zeros(44100 * 3, np.float32), 44100)
    assert frame_rate == 50.0 and mel.shape == (150, 64)
    mel, frame_rate = mel_spectrogram(np.zeros(22050 * 2, np.float32), 22050, n_mels=32, frame_rate_hz=60.0)
    hop = round(22050 / 60.0)
    assert frame_rate == 22050 / hop
    assert mel.shape == (22050 * 2 // hop, 32)


def test_mel_frame_t_starts_at_t_hops():
    rate, hop = 16000, 320
    samples = np.zeros(rate, np.float32)
    samples[10 * hop : 11 * hop] = sine(2000.0, rate, hop / rate)
    mel, _ = mel_spectrogram(samples, rate)
    energy = mel.max(axis=1)
    assert energy.argmax() == 10
    # non-centred frames: the neighbours never see the burst
    assert energy[9] < energy[10] - 60 and energy[11] < energy[10] - 60


def test_mel_chunks_agree():
    samples = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32)
    whole, _ = mel_spectrogram(samples, 16000, fmax=6000.0)
    chunked, _ = mel_spectrogram(samples, 16000, fmax=6000.0, chunk_frames=7)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


# --- EnCodec ------------------------------------------------------------------------------------------


def test_n_codebooks_table():
    assert CODEBOOK_KBPS == 0.75
    assert [n_codebooks(bw) for bw in (1.5, 3, 6, 12, 24)] == [2, 4, 8, 16, 32]
    assert [n_codebooks(bw, "encodec_48khz") for bw in (3, 6, 12, 24)] == [2, 4, 8, 16]
    with pytest.raises(ValueError, match="expected one of 1.5, 3, 6, 12, 24"):
        n_codebooks(5.0)


@pytest.fixture(scope="module")
def noise_16k():
    rng = np.random.default_rng(1)
    return (0.1 * rng.standard_normal(int(16000 * 2.01)) + sine(300.0, 16000, 2.01)).astype(np.float32)


@pytest.mark.parametrize("bandwidth", [1.5, 6.0])
def test_encode_codes_shape_and_content(noise_16k, bandwidth):
    model = load_encodec("random", bandwidth=bandwidth)
    codes = encode_codes(noise_16k, 16000, model, progress=False)
    n_resampled = math.ceil(len(noise_16k) * 24000 / 16000)
    assert codes.dtype == np.int16
    assert codes.shape == (n_codebooks(bandwidth), math.ceil(n_resampled / 320))
    assert codes.min() >= 0 and codes.max() < 1024
    assert all(len(np.unique(row)) > 1 for row in codes)


def test_chunked_encoding_keeps_code_count(noise_16k):
    model = load_encodec("random", bandwidth=6.0)
    whole = encode_codes(noise_16k, 16000, model, chunk_s=30.0, progress=False)
    chunked = encode_codes(noise_16k, 16000, model, chunk_s=0.5, progress=False)
    assert chunked.shape == whole.shape


def test_random_model_is_seeded(noise_16k):
    first = encode_codes(noise_16k, 16000, load_encodec("random", seed=0), progress=False)
    again = encode_codes(noise_16k, 16000, load_encodec("random", seed=0), progress=False)
    other = encode_codes(noise_16k, 16000, load_encodec("random", seed=1), progress=False)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_bad_bandwidth_names_valid_values():
    with pytest.raises(ValueError, match="expected one of 1.5, 3, 6, 12, 24"):
        load_encodec("random", bandwidth=5.0)


def test_pretrained_offline_says_how_to_fix(monkeypatch):
    # weights cached under ~/.cache/torch would bypass the network: refuse every download instead
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DataError) as caught:
        load_encodec("encodec_24khz")
    message = str(caught.value)
    assert message.startswith("encodec_24khz: pretrained EnCodec weights could not be downloaded")
    assert "set audio.encodec_model to its local path" in message


def test_local_checkpoint_round_trips(tmp_path, noise_16k):
    model = load_encodec("random", bandwidth=3.0, seed=3)
    checkpoint = tmp_path / "encodec.th"
    torch.save(model.state_dict(), checkpoint)
    loaded = load_encodec(str(checkpoint), bandwidth=3.0)
    assert not loaded.training
    np.testing.assert_array_equal(
        encode_codes(noise_16k, 16000, loaded, progress=False),
        encode_codes(noise_16k, 16000, model, progress=False),
    )


def test_local_48khz_checkpoint_encodes_stereo_in_one_second_chunks(tmp_path):
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_48khz(pretrained=False)
    for layer in model.quantizer.vq.layers:
        layer._codebook.embed.data.normal_()
        layer._codebook.inited.data.fill_(1)
    checkpoint = tmp_path / "encodec48.th"
    torch.save(model.state_dict(), checkpoint)
    loaded = load_encodec(checkpoint, bandwidth=6.0)
    assert loaded.sample_rate == 48000
    samples = sine(500.0, 48000, 1.5) + 0.05 * np.random.default_rng(2).standard_normal(72000).astype(np.float32)
    codes = encode_codes(samples, 48000, loaded, progress=False)
    assert codes.shape == (4, math.ceil(72000 / 320))


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.th: EnCodec checkpoint not found"):
        load_encodec(str(tmp_path / "nowhere.th"))


def test_check_codes():
    codes = np.random.default_rng(0).integers(0, 1024, (8, 30))
    checked = check_codes(codes, 8, "store/audio_codes.npy")
    assert checked.dtype == np.int16
    np.testing.assert_array_equal(checked, codes)

    with pytest.raises(DataError) as caught:
        check_codes(codes[None], 8, "store/audio_codes.npy")
    message = str(caught.value)
    assert message.startswith("store/audio_codes.npy: EnCodec codes have shape (1, 8, 30)")
    assert "expected (n_codebooks, n_frames) = (8, T)" in message
    assert "codes[0]" in message

    with pytest.raises(DataError, match="have 8 codebooks"):
        check_codes(codes, 4, "codes.npy")
    with pytest.raises(DataError, match="dtype float64"):
        check_codes(codes.astype(np.float64), 8, "codes.npy")
    with pytest.raises(DataError, match=r"range over \[\d+, 1024\]"):
        check_codes(np.concatenate([codes, np.full((8, 1), 1024)], axis=1), 8, "codes.npy")
    negative = codes.copy()
    negative[3, 7] = -1
    with pytest.raises(DataError, match=r"range over \[-1, "):
        check_codes(negative, 8, "codes.npy")
