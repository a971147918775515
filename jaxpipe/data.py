"""Token data: byte-level text (built-in: the Python standard library's sources) or token ids.

Batches are drawn by step number from a seeded generator, so the data order is the same for
every pipeline shape and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np

from jaxpipe.config import ConfigError

BYTE_VOCAB = 256
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".csv", ".tex"}


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenData:
    """A flat stream of token ids with a held-out tail for evaluation."""

    tokens: np.ndarray
    vocab_size: int
    source: str
    eval_fraction: float = 0.02

    @property
    def split(self) -> int:
        return int(len(self.tokens) * (1 - self.eval_fraction))

    def check(self, seq_len: int) -> None:
        """Raises ConfigError unless both splits hold a window of seq_len + 1 tokens (call it
        before training: the eval split is first read after the last step)."""
        for split in ("train", "eval"):
            self._bounds(split, seq_len)

    def _bounds(self, split: str, seq_len: int) -> tuple[int, int]:
        lo, hi = (0, self.split) if split == "train" else (self.split, len(self.tokens))
        if hi - lo < seq_len + 2:
            raise ConfigError(
                f"{split} data from {self.source} has {hi - lo} tokens, fewer than seq_len + 2 ="
                f" {seq_len + 2}; use more data or a shorter --seq_len"
            )
        return lo, hi

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Windows [batch_size, seq_len + 1] for `step`; a pure function of its arguments."""
        lo, hi = self._bounds(split, seq_len)
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(lo, hi - seq_len - 1, size=batch_size)
        return np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training tokens' unigram distribution: a loss to beat."""
        counts = np.bincount(self.tokens[: self.split], minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def stdlib_text_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3")
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not any(part in skip for part in p.relative_to(root).parts)
    ]
    if not files:
        raise ConfigError(f"no Python sources found under {root}; pass --data")
    return files


def _read_text_files(files: list[Path], max_bytes: int) -> np.ndarray:
    chunks, total = [np.zeros(0, np.uint8)], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(np.frombuffer(data, np.uint8))
        total += len(data)
        if total >= max_bytes:
            break
    return np.concatenate(chunks).astype(np.int32)[:max_bytes]


def load_data(path: str | None = None, max_bytes: int = 8 << 20) -> TokenData:
    """Built-in stdlib text (path None), text file(s)/directory, or token ids (.npy / .bin)."""
    if path is None:
        return TokenData(_read_text_files(stdlib_text_files(), max_bytes), BYTE_VOCAB, "stdlib")
    p = Path(path)
    _check_kind(p)
    if not p.exists():
        raise ConfigError(f"--data {path!r} does not exist; give a text file, a directory, or "
                          f"a .npy/.bin file of token ids")
    if p.suffix == ".npy":
        tokens = np.load(p).reshape(-1).astype(np.int32)
        return _checked(TokenData(tokens, int(tokens.max(initial=0)) + 1, str(p)))
    if p.suffix == ".bin":
        tokens = np.fromfile(p, dtype=np.uint16).astype(np.int32)
        return _checked(TokenData(tokens, int(tokens.max(initial=0)) + 1, str(p)))
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and (f.suffix in _TEXT_SUFFIXES or not f.suffix)
        )
    else:
        files = [p]
    return _checked(TokenData(_read_text_files(files, max_bytes), BYTE_VOCAB, str(p)))


def _check_kind(p: Path) -> None:
    """Only regular files and directories: a FIFO or device would block or never end."""
    if p.exists() and not (p.is_file() or p.is_dir()):
        raise ConfigError(f"--data {str(p)!r} is not a regular file or a directory (a FIFO, "
                          f"socket or device); save the tokens or text to a file first")


def _checked(data: TokenData) -> TokenData:
    if len(data.tokens) == 0:
        raise ConfigError(f"--data {data.source!r} holds no tokens; point it at non-empty text")
    if data.tokens.min() < 0:
        raise ConfigError(f"--data {data.source!r} holds negative token ids")
    return data
