"""Movie probing and frame decoding (PyAV).

Frame times come from presentation timestamps (PTS), measured from the video
stream's start: NTSC rates such as 24000/1001 stay exact over a whole movie and
variable-frame-rate files keep their true timing. ``regular_grid_index`` then
maps any decoded sequence onto a regular grid without time-stretching.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import av
import numpy as np

from giblet.errors import DataError
from giblet.progress import bar

PathLike = Union[str, Path]

MOVIE_EXPECTED = "a movie file FFmpeg can read (e.g. MP4/M4V with H.264 video and AAC audio)"


@dataclass(frozen=True)
class MovieInfo:
    path: str
    start_s: float  # video stream start: the origin of every time giblet reports
    duration_s: float
    fps: float
    fps_fraction: str
    n_frames_estimate: int
    width: int
    height: int
    video_codec: str
    has_audio: bool
    audio_rate: Optional[int]
    audio_channels: Optional[int]
    audio_codec: Optional[str]
    audio_duration_s: Optional[float]


def _open_container(path: PathLike) -> "av.container.InputContainer":
    """Open ``path`` for reading; missing or unreadable files raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found", expected=MOVIE_EXPECTED, fix="check the path in the data settings")
    if not path.is_file():
        raise DataError(path, "is a directory, not a file", expected=MOVIE_EXPECTED)
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise DataError(
            path,
            f"cannot be read as a movie ({err})",
            expected=MOVIE_EXPECTED,
            fix="check the file is complete, or re-encode it with ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4",
        ) from err


def _video_stream(container, path: PathLike):
    if not container.streams.video:
        raise DataError(path, "has no video stream", expected=MOVIE_EXPECTED)
    return container.streams.video[0]


def _start_pts(stream, container) -> Fraction:
    """Start of ``stream`` in seconds as an exact fraction."""
    if stream.start_time is not None and stream.time_base is not None:
        return Fraction(stream.start_time) * stream.time_base
    if container.start_time is not None:
        return Fraction(container.start_time, av.time_base)
    return Fraction(0)


def _video_start_s(container) -> Fraction:
    """Origin of the clock shared by video and audio: the video stream start (0 without video)."""
    if not container.streams.video:
        return Fraction(0)
    return _start_pts(container.streams.video[0], container)


def _frame_rate(stream, path: PathLike) -> Fraction:
    candidates = (stream.average_rate, stream.guessed_rate, stream.base_rate)
    if stream.start_time is None:
        # without timestamps the average rate is a demuxer default (25); the codec's own timing is better
        candidates = (stream.guessed_rate, stream.average_rate, stream.base_rate)
    for rate in candidates:
        if rate is not None and rate > 0:
            return Fraction(rate)
    raise DataError(path, "video stream has no frame rate", expected="a positive average frame rate (e.g. 25 or 24000/1001)")


def _stream_duration_s(stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    return None


def _count_packets(container, stream, path: PathLike) -> int:
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as err:
        raise DataError(path, f"video stream cannot be read ({err})", expected=MOVIE_EXPECTED) from err


def probe_movie(path: PathLike) -> MovieInfo:
    """Read container metadata (no full decode)."""
    with _open_container(path) as container:
        video = _video_stream(container, path)
        fps = _frame_rate(video, path)
        start = _start_pts(video, container)
        duration_s = _stream_duration_s(video)
        if duration_s is None and container.duration is not None:
            duration_s = container.duration / av.time_base - float(start)
        n_frames = int(video.frames or 0)
        if duration_s is None and not n_frames:
            # raw elementary streams (e.g. .h264) carry no duration: count packets, which needs no decoding
            n_frames = _count_packets(container, video, path)
        if duration_s is None and n_frames:
            duration_s = n_frames / float(fps)
        if duration_s is None or duration_s <= 0:
            raise DataError(
                path, f"video duration is {duration_s}", expected="a positive duration in the stream or container metadata"
            )
        if not n_frames:
            n_frames = int(round(duration_s * float(fps)))
        ctx = video.codec_context
        if not ctx.width or not ctx.height:
            raise DataError(path, f"video size is {ctx.width}x{ctx.height}", expected="a positive width and height")
        audio = container.streams.audio[0] if container.streams.audio else None
        return MovieInfo(
            path=str(path),
            start_s=float(start),
            duration_s=float(duration_s),
            fps=float(fps),
            fps_fraction=str(fps),
            n_frames_estimate=n_frames,
            width=int(ctx.width),
            height=int(ctx.height),
            video_codec=ctx.name,
            has_audio=audio is not None,
            audio_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
            audio_channels=int(audio.codec_context.layout.nb_channels) if audio is not None else None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_duration_s=_stream_duration_s(audio) if audio is not None else None,
        )


def iter_frames(
    path: PathLike, width: int = 160, height: int = 90, chunk: int = 256, progress: bool = True
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Decode in order, area-resized to ``width`` x ``height`` RGB.

    Yields ``(frames uint8 (k, height, width, 3), times float64 (k,))`` with times in
    seconds from the video stream start, taken from each frame's PTS.
    """
    for name, value in (("width", width), ("height", height), ("chunk", chunk)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # probing here, outside the generator, reports a bad file when iter_frames is called
    info = probe_movie(path)
    return _decode_frames(path, width, height, chunk, progress, info.n_frames_estimate)


def _decode_frames(
    path: PathLike, width: int, height: int, chunk: int, progress: bool, n_frames_estimate: int
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        time_base = stream.time_base
        start = _start_pts(stream, container)
        frame_period = 1 / _frame_rate(stream, path)
        frames = np.empty((chunk, height, width, 3), np.uint8)
        times = np.empty(chunk, np.float64)
        filled = 0
        previous: Optional[Fraction] = None
        index = 0
        with bar("decode video", total=n_frames_estimate, show=None if progress else False) as progress_bar:
            try:
                for frame in container.decode(stream):
                    if frame.pts is not None:
                        # rational until the end: 1/24000 has no exact float, so round once per frame, not per step
                        time = Fraction(frame.pts) * time_base - start
                    else:
                        time = (previous + frame_period) if previous is not None else Fraction(0)
                    previous = time
                    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                    frames[filled] = rgb.to_ndarray()
                    times[filled] = float(time)
                    filled += 1
                    index += 1
                    if filled == chunk:
                        progress_bar.advance(filled)
                        yield frames.copy(), times.copy()
                        filled = 0
            except av.error.FFmpegError as err:
                raise DataError(
                    path,
                    f"video decoding failed after frame {index} ({err})",
                    expected="a complete, undamaged video stream",
                    fix="re-encode the movie with ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4",
                ) from err
            if filled:
                progress_bar.advance(filled)
                yield frames[:filled].copy(), times[:filled].copy()
        if index == 0:
            raise DataError(path, "video stream decoded to 0 frames", expected="at least one frame")


def read_frames(path: PathLike, width: int = 160, height: int = 90, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """All frames and their times (see ``iter_frames``)."""
    frame_chunks, time_chunks = [], []
    for frames, times in iter_frames(path, width=width, height=height, progress=progress):
        frame_chunks.append(frames)
        time_chunks.append(times)
    return np.concatenate(frame_chunks), np.concatenate(time_chunks)


def _check_times(times: np.ndarray, fps: float) -> np.ndarray:
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {times.shape}")
    if np.any(np.diff(times) < 0):
        first = int(np.argmax(np.diff(times) < 0))
        raise ValueError(
            f"times must be non-decreasing; times[{first}]={times[first]} > times[{first + 1}]={times[first + 1]}"
        )
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return times


def regular_grid_index(times: np.ndarray, fps: float, duration_s: float) -> np.ndarray:
    """For grid time ``i / fps``, i in ``[0, round(duration_s * fps))``, the index of the frame on screen.

    That is the last frame with ``time <= i / fps`` (1 microsecond slack for rounding), or
    frame 0 before the first frame. Identity for constant-rate video.
    """
    times = _check_times(times, fps)
    n_grid = int(round(duration_s * fps))
    grid = np.arange(n_grid, dtype=np.float64) / fps
    index = np.searchsorted(times, grid + 1e-6, side="right") - 1
    return np.maximum(index, 0).astype(np.int64)


def is_regular(times: np.ndarray, fps: float, tolerance_frames: float = 0.25) -> bool:
    """Whether every ``times[i]`` is within ``tolerance_frames / fps`` of ``times[0] + i / fps``."""
    times = np.asarray(times, np.float64)
    if times.ndim != 1:
        raise ValueError(f"times must be 1-D, got shape {times.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if times.size == 0:
        return True
    expected = times[0] + np.arange(times.size) / fps
    return bool(np.all(np.abs(times - expected) <= tolerance_frames / fps))
