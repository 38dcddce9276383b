"""Movie probing and decoding on small H.264/AAC files written here with PyAV.

Each frame shows its index in binary (8 white/black stripes across the top half);
the bottom half holds 1-pixel black/white columns (left) and a solid colour (right).
"""

from fractions import Fraction

import av
import numpy as np
import pytest

from giblet.data.video import MovieInfo, is_regular, iter_frames, probe_movie, read_frames, regular_grid_index
from giblet.errors import DataError
from media import encode_stereo, write_mono_wav

WIDTH, HEIGHT = 64, 48
PATCH_RGB = (200, 60, 40)


def frame_image(index: int) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(8):
        if (index >> bit) & 1:
            image[: HEIGHT // 2, bit * 8 : (bit + 1) * 8] = 255
    image[HEIGHT // 2 :, 0 : WIDTH // 2 : 2] = 255
    image[HEIGHT // 2 :, WIDTH // 2 :] = PATCH_RGB
    return image


def shown_index(frame: np.ndarray) -> int:
    """The index a decoded frame displays, read from its stripes at any width that is a multiple of 8."""
    stripe = frame.shape[1] // 8
    top = frame[: frame.shape[0] // 2].astype(float)
    return sum(int(top[:, b * stripe : (b + 1) * stripe].mean() > 128) << b for b in range(8))


def write_movie(path, n_frames, rate=Fraction(25), pts_ms=None, audio=True):
    """H.264 (lossless) movie; ``pts_ms`` gives explicit millisecond timestamps (variable frame rate)."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=rate)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.options = {"crf": "0", "preset": "ultrafast"}
    if pts_ms is not None:
        video.codec_context.time_base = video.time_base = Fraction(1, 1000)
    sound = container.add_stream("aac", rate=44100, layout="stereo") if audio else None
    for i in range(n_frames):
        frame = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if sound is not None:
        n_samples = int(44100 * n_frames / rate)
        wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n_samples) / 44100)).astype(np.float32)
        encode_stereo(container, sound, np.stack([wave, wave]), 44100)
    container.close()
    return path


@pytest.fixture(scope="module")
def movie_25(tmp_path_factory):
    return write_movie(tmp_path_factory.mktemp("movies") / "pal.mp4", 50)


@pytest.fixture(scope="module")
def movie_ntsc(tmp_path_factory):
    return write_movie(tmp_path_factory.mktemp("movies") / "ntsc.mp4", 480, rate=Fraction(24000, 1001), audio=False)


VFR_PTS_MS = [0, 40, 80, 200, 230, 400, 410, 700, 1000, 1040]


@pytest.fixture(scope="module")
def movie_vfr(tmp_path_factory):
    return write_movie(tmp_path_factory.mktemp("movies") / "vfr.mp4", len(VFR_PTS_MS), pts_ms=VFR_PTS_MS, audio=False)


def test_probe_reads_container_metadata(movie_25):
    info = probe_movie(movie_25)
    assert isinstance(info, MovieInfo)
    assert info.path == str(movie_25)
    assert (info.width, info.height, info.video_codec) == (WIDTH, HEIGHT, "h264")
    assert info.fps == 25.0 and info.fps_fraction == "25"
    assert info.start_s == 0.0
    assert info.duration_s == pytest.approx(2.0)
    assert info.n_frames_estimate == 50
    assert info.has_audio and info.audio_codec == "aac"
    assert (info.audio_rate, info.audio_channels) == (44100, 2)
    assert info.audio_duration_s == pytest.approx(2.0, abs=0.05)


def test_probe_ntsc_rate_is_exact(movie_ntsc):
    info = probe_movie(movie_ntsc)
    assert info.fps_fraction == "24000/1001"
    assert info.fps == 24000 / 1001
    assert info.n_frames_estimate == 480
    assert info.duration_s == pytest.approx(480 * 1001 / 24000)
    assert not info.has_audio
    assert info.audio_rate is None and info.audio_channels is None and info.audio_codec is None


def test_frames_come_in_order_with_pts_times(movie_25):
    frames, times = read_frames(movie_25, width=32, height=24, progress=False)
    assert frames.shape == (50, 24, 32, 3) and frames.dtype == np.uint8
    assert times.dtype == np.float64
    assert [shown_index(f) for f in frames] == list(range(50))
    np.testing.assert_allclose(times, np.arange(50) / 25, atol=1e-9)
    assert is_regular(times, 25.0)
    np.testing.assert_array_equal(regular_grid_index(times, 25.0, 2.0), np.arange(50))


def test_iter_frames_chunks_concatenate_to_read_frames(movie_25):
    chunks = list(iter_frames(movie_25, width=16, height=12, chunk=7, progress=False))
    assert [len(frames) for frames, _ in chunks] == [7] * 7 + [1]
    assert all(len(frames) == len(times) for frames, times in chunks)
    frames, times = read_frames(movie_25, width=16, height=12, progress=False)
    np.testing.assert_array_equal(np.concatenate([f for f, _ in chunks]), frames)
    np.testing.assert_array_equal(np.concatenate([t for _, t in chunks]), times)


def test_frames_are_area_averaged_when_read_small(movie_25):
    frames, _ = read_frames(movie_25, width=16, height=12, progress=False)
    columns = frames[:, 7:, 1:7].astype(float)  # 1-pixel black/white columns, away from the patch edge
    patch = frames[:, 7:, 9:15].reshape(len(frames), -1, 3).astype(float)
    # point sampling would give 0 or 255 here; a 4x4 area average of alternating columns is mid-grey
    assert np.all(np.abs(columns - 127.5) < 10)
    np.testing.assert_allclose(patch.mean(axis=1), np.tile(PATCH_RGB, (len(frames), 1)), atol=5)


def test_ntsc_times_stay_exact(movie_ntsc):
    info = probe_movie(movie_ntsc)
    frames, times = read_frames(movie_ntsc, width=16, height=12, progress=False)
    assert len(times) == 480
    np.testing.assert_allclose(times, np.arange(480) * 1001 / 24000, rtol=0, atol=1e-6)
    assert [shown_index(f) for f in frames] == [i % 256 for i in range(480)]
    assert is_regular(times, info.fps)
    assert not is_regular(times, 25.0)
    np.testing.assert_array_equal(regular_grid_index(times, info.fps, info.duration_s), np.arange(480))


def test_variable_frame_rate_keeps_true_times(movie_vfr):
    frames, times = read_frames(movie_vfr, width=16, height=12, progress=False)
    np.testing.assert_allclose(times, np.array(VFR_PTS_MS) / 1000, atol=1e-6)
    assert [shown_index(f) for f in frames] == list(range(len(VFR_PTS_MS)))
    assert not is_regular(times, 25.0)


def test_regular_grid_picks_frame_on_screen(movie_vfr):
    frames, times = read_frames(movie_vfr, width=16, height=12, progress=False)
    duration_s = 1.08
    index = regular_grid_index(times, 25.0, duration_s)
    assert index.dtype == np.int64 and len(index) == 27
    for i, frame_index in enumerate(index):
        grid_ms = i * 40
        on_screen = max(k for k, pts in enumerate(VFR_PTS_MS) if pts <= grid_ms)
        assert frame_index == on_screen, f"grid {grid_ms} ms"
        assert shown_index(frames[frame_index]) == on_screen
    assert list(index[5:10]) == [3, 4, 4, 4, 4]  # 200, 230 ms hold until 400 ms


def test_regular_grid_before_first_frame_and_bad_times():
    np.testing.assert_array_equal(regular_grid_index(np.array([0.1, 0.2]), 10.0, 0.4), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        regular_grid_index(np.array([0.0, 0.2, 0.1]), 10.0, 0.3)
    assert is_regular(np.array([0.5, 0.54, 0.581]), 25.0)
    assert not is_regular(np.array([0.5, 0.54, 0.59]), 25.0)


def test_missing_frame_timestamps_use_frame_rate(tmp_path):
    # a raw H.264 stream has no container timestamps: every pts is None
    path = tmp_path / "raw.h264"
    container = av.open(str(path), "w", format="h264")
    video = container.add_stream("libx264", rate=Fraction(30000, 1001))
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.options = {"crf": "0", "preset": "ultrafast"}
    for i in range(12):
        for packet in video.encode(av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    container.close()
    info = probe_movie(path)
    assert info.n_frames_estimate == 12
    frames, times = read_frames(path, width=16, height=12, progress=False)
    assert [shown_index(f) for f in frames] == list(range(12))
    np.testing.assert_allclose(times, np.arange(12) / info.fps, atol=1e-9)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.m4v"
    with pytest.raises(DataError, match="absent.m4v: file not found"):
        probe_movie(path)
    with pytest.raises(DataError, match="absent.m4v"):
        iter_frames(path)


def test_corrupt_file_names_it(tmp_path, movie_25):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.mp4: cannot be read as a movie") as caught:
        probe_movie(garbage)
    assert "expected a movie file" in str(caught.value) and "Fix:" in str(caught.value)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(movie_25.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated.mp4"):
        read_frames(truncated, progress=False)


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    write_mono_wav(path, np.zeros(800, np.int16), 8000)
    with pytest.raises(DataError, match="sound.wav: has no video stream"):
        probe_movie(path)
