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
_MAX_ID = 2**31 - 1  # token ids are int32
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".csv", ".tex"}


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenData:
    """A flat stream of token ids with a held-out tail for evaluation; `tokenizer` is the
    tokenizer.json the ids belong to (None: bytes, or ids of an unnamed tokenizer)."""

    tokens: np.ndarray
    vocab_size: int
    source: str
    eval_fraction: float = 0.02
    tokenizer: str | None = None

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


def _unreadable(path: Path, e: OSError) -> ConfigError:
    return ConfigError(
        f"--data {str(path)!r} cannot be read ({e.strerror or type(e).__name__}); check its "
        f"permissions or pass another --data"
    )


def read_files(files: list[Path], max_bytes: int) -> list[bytes]:
    """The bytes of each file in turn, at most `max_bytes` in all (the last one read may be cut
    short; files past the limit are left out)."""
    chunks, total = [], 0
    for path in files:
        if not path.is_file():
            raise ConfigError(
                f"--data {str(path)!r} is not a regular file; give a text file, a directory, or "
                f"a .npy/.bin file of token ids"
            )
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes - total)
        except OSError as e:
            raise _unreadable(path, e) from None
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return chunks


def _read_text_files(files: list[Path], max_bytes: int) -> np.ndarray:
    chunks = [np.frombuffer(c, np.uint8) for c in read_files(files, max_bytes)]
    return np.concatenate([np.zeros(0, np.uint8), *chunks]).astype(np.int32)


def _token_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    """int32 token ids from a loaded array, refusing anything a cast would change."""
    if ids.dtype.kind not in "iu":
        hint = " (convert with ids.astype(np.int32) if they are whole numbers)"
        raise ConfigError(
            f"--data {str(path)!r} holds {ids.dtype} values; token ids must be integers"
            f"{hint if ids.dtype.kind == 'f' else ''}"
        )
    if ids.ndim != 1:
        raise ConfigError(
            f"--data {str(path)!r} holds an array of shape {ids.shape}; token ids must be one "
            f"flat sequence (save ids.reshape(-1) to train on the rows one after another)"
        )
    if ids.size and ids.dtype.kind == "i" and ids.min() < 0:
        raise ConfigError(
            f"--data {str(path)!r} holds negative token ids (smallest {ids.min()}); token ids "
            f"must be >= 0"
        )
    if ids.size and ids.max() > _MAX_ID:
        raise ConfigError(
            f"--data {str(path)!r} holds token id {ids.max()}, above the largest supported id "
            f"{_MAX_ID} (2**31 - 1); token ids must fit in int32"
        )
    return ids.astype(np.int32)


def _load_npy(p: Path) -> np.ndarray:
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            ids = np.load(p, allow_pickle=False)
    except OSError as e:
        if e.strerror:  # the OS refused to read it
            raise _unreadable(p, e) from None
        raise _not_npy(p, e) from None
    except (ValueError, EOFError) as e:  # pickled objects, a bad header, truncated data
        raise _not_npy(p, e) from None
    if magic != b"\x93NUMPY":  # np.load would try pickle, or open a .npz archive
        raise _not_npy(p, "it does not start with the .npy magic bytes")
    return _token_ids(ids, p)


def _not_npy(p: Path, why) -> ConfigError:
    return ConfigError(
        f"--data {str(p)!r} is not a readable .npy array of token ids ({why}); write it with "
        f"np.save(path, ids) where ids is a 1-D integer array"
    )


def _load_bin(p: Path) -> np.ndarray:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _unreadable(p, e) from None
    if len(raw) % 2:
        raise ConfigError(
            f"--data {str(p)!r} has {len(raw)} bytes, an odd number; a .bin file holds "
            f"little-endian uint16 token ids (2 bytes each)"
        )
    return np.frombuffer(raw, "<u2").astype(np.int32)


def load_data(path: str | None = None, max_bytes: int = 8 << 20) -> TokenData:
    """Built-in stdlib text (path None), text file(s)/directory, or token ids.

    Token ids come from a .npy file (a 1-D integer array with ids in [0, 2**31)) or a .bin file
    (little-endian uint16). Text is read as bytes (ids 0-255, any encoding), at most
    `max_bytes` of it. Anything else raises ConfigError naming the file and the fix.
    """
    if path is None:
        return TokenData(_read_text_files(stdlib_text_files(), max_bytes), BYTE_VOCAB, "stdlib")
    p = data_path(path)
    if is_ids_file(p):
        return load_ids(p)
    return _checked(TokenData(_read_text_files(text_files(p), max_bytes), BYTE_VOCAB, str(p)))


def data_path(path: str | Path) -> Path:
    """The --data path, refused unless it is an existing regular file or directory."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"--data must name a file or directory, got {path!r}")
    p = Path(path)
    _check_kind(p)
    if not p.exists():
        raise ConfigError(f"--data {str(path)!r} does not exist; give a text file, a directory, "
                          f"or a .npy/.bin file of token ids")
    return p


def is_ids_file(p: Path) -> bool:
    """Whether a --data path holds token ids (.npy / .bin, in any case) rather than text."""
    return p.suffix.lower() in (".npy", ".bin")


def load_ids(p: Path) -> TokenData:
    """Token ids from a .npy or .bin file."""
    suffix = p.suffix.lower()
    if not p.is_file():
        raise ConfigError(
            f"--data {str(p)!r} is not a regular file; a {suffix} path must be a file of "
            f"token ids"
        )
    tokens = _load_npy(p) if suffix == ".npy" else _load_bin(p)
    return _checked(TokenData(tokens, int(tokens.max(initial=0)) + 1, str(p)))


def text_files(p: Path) -> list[Path]:
    """The text files a --data path names: itself, or a directory's text files in order."""
    if not p.is_dir():
        return [p]
    try:
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and (f.suffix in _TEXT_SUFFIXES or not f.suffix)
        )
    except OSError as e:
        raise _unreadable(p, e) from None
    if not files:
        raise ConfigError(
            f"--data {str(p)!r} is a directory with no text files (suffixes "
            f"{sorted(_TEXT_SUFFIXES)} or none); point it at text or token ids"
        )
    return files


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
