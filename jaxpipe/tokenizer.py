"""Tokenizers: a Hugging Face checkpoint's own `tokenizer.json`, or UTF-8 bytes.

Both kinds have one interface: `encode(text)` -> int32 ids, `decode(ids)` -> text,
`vocab_size` (ids 0 to vocab_size - 1), `unknown(ids)` (the ids `decode` cannot show),
`identity` ("bytes", or "sha256:<hex>" of tokenizer.json) and `describe()`.
`HFTokenizer` runs Hugging Face's `tokenizers` package (an optional dependency: `pip install
"jaxpipe[tokenizers]"`); `ByteTokenizer` is the built-in byte-level one.

`checkpoint_tokenizer(dir, vocab_size)` picks a checkpoint's tokenizer.json (bytes, with a
warning, when it has none); `tokenize_data(path, tokenizer)` is `load_data` for a tokenizer,
caching the ids of text next to it as `<name>.tok-<tokenizer hash>-<text hash>.npy`, so another
tokenizer or changed text never reuses them. A run records its tokenizer as
WORKDIR/tokenizer.json (`save_tokenizer`), which `run_tokenizer` reads back for sampling.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from jaxpipe.config import ConfigError
from jaxpipe.data import (
    BYTE_VOCAB,
    TokenData,
    data_path,
    decode,
    encode,
    is_ids_file,
    load_data,
    load_ids,
    read_files,
    stdlib_text_files,
    text_files,
)

try:
    import tokenizers
except ImportError:  # optional: only checkpoints that carry tokenizer.json need it
    tokenizers = None

TOKENIZER_NAME = "tokenizer.json"
_HASH_CHARS = 12  # of the hex digests in a cache file's name


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Text as its UTF-8 bytes: ids 0-255."""

    vocab_size: int = BYTE_VOCAB
    path: Path | None = None
    identity: str = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def unknown(self, ids) -> list[int]:
        return sorted({int(i) for i in ids if not 0 <= int(i) < BYTE_VOCAB})

    def describe(self) -> str:
        return "UTF-8 bytes"


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer:
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package."""

    path: Path
    sha256: str
    vocab_size: int  # the largest id + 1
    backend: tokenizers.Tokenizer

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text).ids, np.int32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text (in parallel threads)."""
        return [np.asarray(e.ids, np.int32) for e in self.backend.encode_batch(texts)]

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens included; ids in `unknown(ids)` are left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def unknown(self, ids) -> list[int]:
        return sorted(
            i for i in {int(i) for i in ids}
            if not 0 <= i < self.vocab_size or self.backend.id_to_token(i) is None
        )

    def describe(self) -> str:
        return f"{self.path} ({self.vocab_size} ids)"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """A tokenizer.json file (or a directory holding one); ConfigError naming the file and the
    fix when it is missing, unreadable or not a tokenizer."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ConfigError(f"the tokenizer path is empty ({path!r}); give a tokenizer.json file")
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_NAME
    if not p.exists():
        raise ConfigError(f"tokenizer {p} does not exist; give the checkpoint's tokenizer.json")
    if not p.is_file():
        raise ConfigError(f"tokenizer {p} is not a regular file; give a tokenizer.json file")
    if tokenizers is None:
        raise ConfigError(
            f"reading {p} needs the `tokenizers` package, which is not installed; pip install "
            f"'jaxpipe[tokenizers]'"
        )
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read tokenizer {p} ({e.strerror}); check its permissions"
        ) from None
    try:
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        vocab = backend.get_vocab(with_added_tokens=True)
    except UnicodeDecodeError as e:
        raise _corrupt(p, f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust parser raises Exception (or a panic's BaseException)
        raise _corrupt(p, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    if not vocab:
        raise _corrupt(p, "its vocabulary is empty")
    return HFTokenizer(p, hashlib.sha256(raw).hexdigest(), max(vocab.values()) + 1, backend)


def _corrupt(p: Path, why: str) -> ConfigError:
    return ConfigError(
        f"tokenizer {p} is not a valid tokenizer.json ({why}); restore it from the checkpoint's "
        f"original files"
    )


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    """ConfigError when the tokenizer produces ids the model has no embedding for."""
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"tokenizer {tok.describe()} has ids up to {tok.vocab_size - 1} but the model's "
            f"vocab_size is {vocab_size}; use the tokenizer.json that came with the checkpoint"
        )


def checkpoint_tokenizer(
    directory: str | Path, vocab_size: int, override: str | Path | None = None
) -> Tokenizer:
    """`override`, else DIRECTORY/tokenizer.json, else bytes (with a one-line warning), checked
    against the model's vocab_size."""
    if override is None and not os.path.lexists(Path(directory) / TOKENIZER_NAME):
        print(
            f"warning: {directory} has no {TOKENIZER_NAME}; text is tokenized as UTF-8 bytes "
            f"(ids 0-255 of the model's {vocab_size}), not with the model's own tokenizer "
            f"(pass --tokenizer path/to/{TOKENIZER_NAME})",
            file=sys.stderr, flush=True,
        )
        return ByteTokenizer()
    tok = load_tokenizer(Path(directory) / TOKENIZER_NAME if override is None else override)
    check_vocab(tok, vocab_size)
    return tok


def run_tokenizer(workdir: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer a run trained with: `override`, else WORKDIR/tokenizer.json, else bytes."""
    if override is not None:
        return load_tokenizer(override)
    if os.path.lexists(Path(workdir) / TOKENIZER_NAME):
        return load_tokenizer(Path(workdir) / TOKENIZER_NAME)
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Tokenized data


def tokenize_data(path: str | Path | None, tok: Tokenizer, max_bytes: int = 8 << 20) -> TokenData:
    """`load_data` with a tokenizer: text (at most `max_bytes`, UTF-8) is encoded with `tok`,
    each file on its own; ids of text files are cached next to them (the built-in stdlib text
    is not cached). .npy / .bin ids are taken as they are. Bytes for a ByteTokenizer."""
    if isinstance(tok, ByteTokenizer):
        return load_data(path, max_bytes)
    if path is None:
        texts = _texts(stdlib_text_files(), max_bytes, errors="replace")
        print(f"tokenizing the built-in text with {tok.describe()} (not cached)", flush=True)
        return _token_data(np.concatenate(tok.encode_many(texts)), tok, "stdlib")
    p = data_path(path)
    if is_ids_file(p):
        return dataclasses.replace(load_ids(p), tokenizer=str(tok.path))
    files = text_files(p)
    chunks = read_files(files, max_bytes)
    text_hash = hashlib.sha256()
    for c in chunks:
        text_hash.update(len(c).to_bytes(8, "little") + c)
    cache = cache_path(p, tok, text_hash.hexdigest())
    ids = _read_cache(cache, tok)
    if ids is None:
        texts = _texts(files, max_bytes, chunks=chunks)
        ids = np.concatenate([np.zeros(0, np.int32), *tok.encode_many(texts)])
        if len(ids):
            _write_cache(cache, ids)
        print(f"tokenized {p} with {tok.describe()}: {len(ids):,} tokens (cache {cache})",
              flush=True)
    else:
        print(f"read {len(ids):,} tokens of {p} from the cache {cache}", flush=True)
    return _token_data(ids, tok, str(p))


def cache_path(p: Path, tok: HFTokenizer, text_sha256: str) -> Path:
    """Where the ids of text `p` (a file or directory) encoded by `tok` are cached."""
    n = _HASH_CHARS
    return p.parent / f"{p.name}.tok-{tok.sha256[:n]}-{text_sha256[:n]}.npy"


def _token_data(ids: np.ndarray, tok: HFTokenizer, source: str) -> TokenData:
    if len(ids) == 0:
        raise ConfigError(f"--data {source!r} holds no tokens; point it at non-empty text")
    return TokenData(ids, tok.vocab_size, source, tokenizer=str(tok.path))


def _texts(files, max_bytes, errors="strict", chunks=None) -> list[str]:
    """Each file's text; the last may be cut at `max_bytes`, so a partial character there is
    dropped. ConfigError naming the file and offset for bytes that are not UTF-8."""
    chunks = read_files(files, max_bytes) if chunks is None else chunks
    cut = sum(len(c) for c in chunks) >= max_bytes
    texts = []
    for i, (path, chunk) in enumerate(zip(files, chunks, strict=False)):
        last = cut and i == len(chunks) - 1
        try:
            texts.append(codecs.getincrementaldecoder("utf-8")(errors).decode(chunk, not last))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--data {str(path)!r} is not UTF-8 text (byte {chunk[e.start]:#04x} at offset "
                f"{e.start}); the tokenizer reads UTF-8: convert the file (iconv -t UTF-8) or "
                f"pass token ids as .npy"
            ) from None
    return texts


def _read_cache(cache: Path, tok: HFTokenizer) -> np.ndarray | None:
    """The cached ids, or None (rebuild) when there are none or they are unusable."""
    if not cache.is_file():
        return None
    try:
        ids = np.load(cache, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = str(e) or type(e).__name__
    else:
        if ids.dtype == np.int32 and ids.ndim == 1 and len(ids):
            if 0 <= ids.min() and ids.max() < tok.vocab_size:
                return ids
        why = f"a {ids.dtype} array of shape {ids.shape}, not ids 0 to {tok.vocab_size - 1}"
    print(f"warning: the token cache {cache} is unusable ({why}); tokenizing again",
          file=sys.stderr, flush=True)
    return None


def _write_cache(cache: Path, ids: np.ndarray) -> None:
    """Writes the cache atomically and removes stale ones of the same tokenizer (changed text);
    a directory that cannot be written only costs a warning."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, ids, allow_pickle=False)
        os.replace(tmp, cache)
    except OSError as e:
        print(f"warning: cannot write the token cache {cache} ({e.strerror}); the text will be "
              f"tokenized again next run", file=sys.stderr, flush=True)
        tmp.unlink(missing_ok=True)
        return
    stem = cache.name[: -len(".npy") - _HASH_CHARS]  # <name>.tok-<tokenizer hash>-
    for old in cache.parent.iterdir():
        name = old.name
        if name != cache.name and name.startswith(stem) and len(name) == len(cache.name):
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# A run's tokenizer


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_tokenizer(workdir: str | Path, tokenizer: str | None) -> None:
    """Refuses to continue a run in WORKDIR with other token ids: a different tokenizer.json,
    or bytes where the run used a tokenizer (or the reverse, as its config.json records)."""
    w = Path(workdir)
    recorded = w / TOKENIZER_NAME
    try:
        if os.path.lexists(recorded):
            if tokenizer is not None and _sha256(Path(tokenizer)) == _sha256(recorded):
                return
            theirs, fix = f"the tokenizer {recorded}", f"pass --tokenizer {recorded}"
        elif tokenizer is not None and (w / "config.json").is_file():
            saved = json.loads((w / "config.json").read_text())
            if not isinstance(saved, dict) or saved.get("tokenizer", "") is not None:
                return  # a run from before tokenizers were recorded, or an unreadable config
            theirs, fix = "UTF-8 bytes", "drop the tokenizer.json from this run's checkpoint"
        else:
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot compare this run's tokenizer with {workdir}'s ({e}); pass "
                          f"another --workdir") from None
    ours = "UTF-8 bytes" if tokenizer is None else f"the tokenizer {tokenizer}"
    raise ConfigError(
        f"--workdir {workdir} holds a run tokenized with {theirs} but this run uses {ours}; "
        f"{fix}, or use another --workdir"
    )


def save_tokenizer(workdir: str | Path, tokenizer: str | None) -> dict | None:
    """Copies the run's tokenizer.json into WORKDIR (atomically); returns what config.json
    records about it ({"source", "sha256"}, or None for bytes)."""
    if tokenizer is None:
        return None
    try:
        raw = Path(tokenizer).read_bytes()
        dst = Path(workdir) / TOKENIZER_NAME
        tmp = dst.with_name(f".{TOKENIZER_NAME}.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, dst)
    except OSError as e:
        raise ConfigError(f"cannot copy the tokenizer {tokenizer} into {workdir} "
                          f"({e.strerror}); free space or fix permissions") from None
    return {"source": str(tokenizer), "sha256": hashlib.sha256(raw).hexdigest()}
