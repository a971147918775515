"""What every process of a run must agree on: process 0's figures, sent to all of them.

Decisions a run takes from measurements (a CPU profile, layer times, the stage sizes and the
configuration chosen from them) must be the same in every process, or the processes compile
different programs and wait on each other's collectives forever. Each process measures on its
own devices; these helpers hand every process process 0's result. Each is a collective when
there are several processes: every process calls it, in the same order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def process0_floats(values) -> tuple[float, ...]:
    """Process 0's float64 `values` in every process, bit for bit (sent as 32-bit words, which
    JAX passes through unchanged without x64); None goes as NaN and comes back as None."""
    raw = np.array([np.nan if v is None else v for v in values], np.float64)
    if jax.process_count() > 1 and raw.size:  # every process has the same count
        raw = _from_process0(raw.view(np.uint32)).view(np.float64)
    return tuple(None if np.isnan(v) else float(v) for v in raw)


def process0_text(text: str, size: int = 2048) -> str:
    """Process 0's `text` (its first `size` - 4 UTF-8 bytes) in every process."""
    if jax.process_count() == 1:
        return text
    raw = text.encode()[: size - 4]
    buf = np.zeros(size, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(raw)).tobytes(), np.uint8)
    buf[4 : 4 + len(raw)] = np.frombuffer(raw, np.uint8)
    got = _from_process0(buf)
    n = int(np.frombuffer(got[:4].tobytes(), np.uint32)[0])
    return got[4 : 4 + n].tobytes().decode("utf-8", "replace")


def _from_process0(words: np.ndarray) -> np.ndarray:
    """Process 0's array of unsigned words (the same shape and dtype in every process)."""
    return np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(words.dtype)
