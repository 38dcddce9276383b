"""Writing small test movies with PyAV: what the reader tests share."""

import av
import numpy as np


def encode_stereo(container, stream, channels: np.ndarray, rate: int, first_pts: int = 0) -> None:
    """Encode float ``channels (2, n)`` into ``stream`` in 1024-sample frames starting at ``first_pts``, then flush."""
    for start in range(0, channels.shape[1], 1024):
        block = np.ascontiguousarray(channels[:, start : start + 1024], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, first_pts + start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_mono_wav(path, values: np.ndarray, rate: int) -> None:
    """A WAV file (no video stream) holding int16 ``values``."""
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.asarray(values, np.int16)[None], format="s16", layout="mono")
    frame.sample_rate = rate
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
