"""A checkpoint's own tokenizer.json: loading, tokenized and cached --data, sampling with it.

The tokenizer is a small byte-level BPE trained here with the `tokenizers` package (no
downloads), saved next to a tiny GPT-2 checkpoint written by jaxpipe.hf.save_hf.
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpipe import hf, sampling
from jaxpipe import model as M
from jaxpipe import tokenizer as T
from jaxpipe.config import ConfigError, get_preset
from jaxpipe.data import TokenData, load_data

tokenizers = pytest.importorskip("tokenizers", reason="pip install 'jaxpipe[tokenizers]'")

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["def", "return", "self", "pipeline", "stage", "tensor", "héllo", "naïve", "x", "=",
         "(", ")", ":", "micro", "batch", "日本"]


def corpus(seed: int, lines: int = 300) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(lines)) + "\n"


def train_bpe(path: Path, vocab_size: int, seed: int = 0, added: int = 0) -> Path:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus(seed)], trainer=trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(added)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", 320)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe) -> Path:
    """A tiny GPT-2 checkpoint with exactly the BPE's vocabulary, and its tokenizer.json."""
    tok = T.load_tokenizer(bpe)
    cfg = get_preset("tiny", num_layers=2, max_seq_len=32, d_model=16, num_heads=2,
                     vocab_size=tok.vocab_size)
    root = tmp_path_factory.mktemp("hf") / "ckpt"
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: 0.05 * rng.standard_normal(a.shape, np.float32),
                          M.abstract_params(cfg))
    hf.save_hf(cfg, params, str(root))
    shutil.copy(bpe, root / "tokenizer.json")
    return root


# ---------------------------------------------------------------------------------------------
# The tokenizers


def test_bpe_round_trips_and_is_not_bytes(bpe):
    tok = T.load_tokenizer(bpe)
    assert T.load_tokenizer(bpe.parent).sha256 == tok.sha256  # a directory holding it
    assert 300 <= tok.vocab_size <= 320
    assert tok.identity == "sha256:" + hashlib.sha256(bpe.read_bytes()).hexdigest()
    text = "def héllo(self): return pipeline 日本 x = 42\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text.encode())  # merges, not bytes
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(ids, tok.backend.encode(text).ids)
    many = tok.encode_many([text, "stage", ""])
    np.testing.assert_array_equal(many[0], ids)
    assert [len(m) for m in many[1:]] == [len(tok.encode("stage")), 0]
    assert tok.unknown([1, 2, tok.vocab_size, -1]) == [-1, tok.vocab_size]
    b = T.ByteTokenizer()
    assert b.decode(b.encode(text)) == text and b.vocab_size == 256 and b.unknown([5, 256]) == [256]


def test_checkpoint_without_tokenizer_falls_back_to_bytes_with_a_warning(hf_dir, tmp_path, capsys):
    bare = Path(shutil.copytree(hf_dir, tmp_path / "bare"))
    (bare / "tokenizer.json").unlink()
    tok = T.checkpoint_tokenizer(bare, 320)
    assert isinstance(tok, T.ByteTokenizer)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("warning: ")
    assert f"{bare} has no tokenizer.json; text is tokenized as UTF-8 bytes" in err
    assert isinstance(T.checkpoint_tokenizer(hf_dir, 320), T.HFTokenizer)
    assert T.checkpoint_tokenizer(bare, 320, override=hf_dir / "tokenizer.json").vocab_size > 256
    assert capsys.readouterr().err == ""  # no warning when there is a tokenizer


def _write(data: bytes):
    return lambda p: p.write_bytes(data)


BAD_TOKENIZERS = {
    # name: (how tokenizer.json is spoiled, message pattern)
    "empty file": (_write(b""), r"is not a valid tokenizer.json \(EOF while parsing"),
    "truncated JSON": (lambda p: p.write_bytes(p.read_bytes()[:200]),
                       r"is not a valid tokenizer.json \(EOF while parsing"),
    "JSON list": (_write(b"[1, 2]"), r"is not a valid tokenizer.json \(invalid type: sequence"),
    "no model": (_write(b"{}"), r"is not a valid tokenizer.json \(Model missing"),
    "BPE without a vocabulary": (_write(b'{"model": {"type": "BPE"}}'),
                                 r"is not a valid tokenizer.json \(Missing vocab/merges"),
    "not UTF-8": (_write(b'{"a": "\xff\xfe"}'),
                  r"is not a valid tokenizer.json \(not UTF-8 text: byte 0xff at offset 7\)"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()),
                    r"tokenizer .*tokenizer.json does not exist"),
    "dangling symlink": (lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.json")),
                         r"tokenizer .*tokenizer.json does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_TOKENIZERS))
def test_bad_tokenizer_file_is_a_clear_error(hf_dir, tmp_path, name):
    spoil, pattern = BAD_TOKENIZERS[name]
    path = Path(shutil.copytree(hf_dir, tmp_path / "ckpt"))
    spoil(path / "tokenizer.json")
    with pytest.raises(ConfigError, match=pattern) as e:
        T.checkpoint_tokenizer(path, 320)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_larger_than_the_model_is_refused(hf_dir):
    tok = T.load_tokenizer(hf_dir / "tokenizer.json")
    with pytest.raises(ConfigError, match=rf"has ids up to {tok.vocab_size - 1} but the model's "
                       rf"vocab_size is 200; use the tokenizer.json that came with"):
        T.checkpoint_tokenizer(hf_dir, 200)
    T.check_vocab(tok, tok.vocab_size)  # equal is fine


def test_other_tokenizer_path_errors(tmp_path, hf_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"the tokenizer path is empty"):
        T.load_tokenizer("")
    with pytest.raises(ConfigError, match=r"tokenizer .*nope.json does not exist"):
        T.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "sock").mkdir()
    os.mkfifo(tmp_path / "sock" / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"is not a regular file; give a tokenizer.json file"):
        T.load_tokenizer(tmp_path / "sock")
    monkeypatch.setattr(T, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"needs the `tokenizers` package, which is not "
                       r"installed; pip install 'jaxpipe\[tokenizers\]'"):
        T.load_tokenizer(hf_dir)


# ---------------------------------------------------------------------------------------------
# Tokenized --data and its cache


def _fail_encoding(monkeypatch):
    def fail(self, texts):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(T.HFTokenizer, "encode_many", fail)


def test_text_is_tokenized_and_cached(bpe, tmp_path, monkeypatch, capsys):
    tok = T.load_tokenizer(bpe)
    text = corpus(7)
    data_file = tmp_path / "corpus.txt"
    data_file.write_text(text)
    data = T.tokenize_data(data_file, tok)
    expected = np.asarray(tok.backend.encode(text).ids, np.int32)
    np.testing.assert_array_equal(data.tokens, expected)
    assert data.vocab_size == tok.vocab_size and data.tokenizer == str(bpe)
    (cache,) = tmp_path.glob("*.npy")
    assert re.fullmatch(rf"corpus\.txt\.tok-{tok.sha256[:12]}-[0-9a-f]{{12}}\.npy", cache.name)
    np.testing.assert_array_equal(np.load(cache), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", cache.name]
    assert load_data(str(data_file)).tokens.max() < 256  # train_lm.py still reads bytes

    with monkeypatch.context() as m:  # the second read comes from the cache
        _fail_encoding(m)
        np.testing.assert_array_equal(T.tokenize_data(data_file, tok).tokens, expected)
    assert "from the cache" in capsys.readouterr().out

    data_file.write_text(text + "stage tensor\n")  # changed text: rebuilt, the stale cache goes
    changed = T.tokenize_data(data_file, tok)
    np.testing.assert_array_equal(changed.tokens, tok.encode(text + "stage tensor\n"))
    assert not cache.exists() and len(list(tmp_path.glob("*.npy"))) == 1

    other = T.load_tokenizer(train_bpe(tmp_path / "other" / "tokenizer.json", 300, seed=1))
    assert other.sha256 != tok.sha256
    np.testing.assert_array_equal(T.tokenize_data(data_file, other).tokens,
                                  other.encode(text + "stage tensor\n"))
    assert len(list(tmp_path.glob("corpus.txt.tok-*.npy"))) == 2  # one per tokenizer


def test_corrupt_cache_is_rebuilt(bpe, tmp_path, capsys):
    tok = T.load_tokenizer(bpe)
    data_file = tmp_path / "c.txt"
    data_file.write_text(corpus(2))
    first = T.tokenize_data(data_file, tok).tokens
    (cache,) = tmp_path.glob("*.npy")
    spoilers = [
        lambda: cache.write_bytes(b"garbage"),
        lambda: np.save(cache, np.full(10, 10**6, np.int32)),  # ids the tokenizer cannot produce
        lambda: np.save(cache, np.array(["a", "b"])),
        lambda: cache.write_bytes(cache.read_bytes()[:-8]),  # truncated
    ]
    for spoil in spoilers:
        spoil()
        capsys.readouterr()
        np.testing.assert_array_equal(T.tokenize_data(data_file, tok).tokens, first)
        assert re.search(r"warning: the token cache .* is unusable", capsys.readouterr().err)
        np.testing.assert_array_equal(np.load(cache), first)


def test_unwritable_data_directory_still_tokenizes(bpe, tmp_path, monkeypatch, capsys):
    tok = T.load_tokenizer(bpe)
    (tmp_path / "c.txt").write_text(corpus(3))

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(T.os, "replace", read_only)
    data = T.tokenize_data(tmp_path / "c.txt", tok)
    np.testing.assert_array_equal(data.tokens, tok.encode(corpus(3)))
    err = capsys.readouterr().err
    assert re.match(r"warning: cannot write the token cache .*c.txt.tok-.*\.npy \(Read-only file "
                    r"system\); the text will be tokenized again next run", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]  # no temporary file left


def test_directory_and_ids_and_bad_text(bpe, tmp_path):
    tok = T.load_tokenizer(bpe)
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text(corpus(4, 100))
    (d / "b.md").write_text(corpus(5, 100))
    data = T.tokenize_data(d, tok)
    np.testing.assert_array_equal(
        data.tokens, np.concatenate([tok.encode(corpus(4, 100)), tok.encode(corpus(5, 100))])
    )
    assert len(list(tmp_path.glob("texts.tok-*.npy"))) == 1  # next to the directory
    ids = np.arange(50, dtype=np.int32)
    np.save(tmp_path / "ids.npy", ids)
    given = T.tokenize_data(tmp_path / "ids.npy", tok)
    np.testing.assert_array_equal(given.tokens, ids)
    assert given.tokenizer == str(bpe)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.txt' is not UTF-8 text \(byte 0xe9 at offset "
                       r"3\); the tokenizer reads UTF-8"):
        T.tokenize_data(tmp_path / "latin1.txt", tok)
    (tmp_path / "cut.txt").write_text("ab日本")  # cut inside 本: the partial character goes
    np.testing.assert_array_equal(T.tokenize_data(tmp_path / "cut.txt", tok, max_bytes=7).tokens,
                                  tok.encode("ab日"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"holds no tokens"):
        T.tokenize_data(tmp_path / "empty.txt", tok)
    assert T.tokenize_data(tmp_path / "cut.txt", T.ByteTokenizer()).tokens.max() == 0xE6
    builtin = T.tokenize_data(None, tok, max_bytes=20_000)  # the stdlib text, not cached
    assert builtin.source == "stdlib" and builtin.tokenizer == str(bpe)
    assert 0 < len(builtin.tokens) < 20_000 and builtin.tokens.max() < tok.vocab_size


def test_a_workdir_keeps_its_tokenizer(bpe, tmp_path):
    w = tmp_path / "run"
    w.mkdir()
    T.check_same_tokenizer(w, str(bpe))  # nothing recorded yet
    record = T.save_tokenizer(w, str(bpe))
    assert record == {"source": str(bpe), "sha256": T.load_tokenizer(bpe).sha256}
    assert (w / "tokenizer.json").read_bytes() == bpe.read_bytes()
    T.check_same_tokenizer(w, str(bpe))
    T.check_same_tokenizer(w, str(w / "tokenizer.json"))  # the same file elsewhere
    other = train_bpe(tmp_path / "o" / "tokenizer.json", 300, seed=1)
    with pytest.raises(ConfigError, match=r"holds a run tokenized with the tokenizer .*run/"
                       r"tokenizer.json but this run uses the tokenizer .*o/tokenizer.json"):
        T.check_same_tokenizer(w, str(other))
    with pytest.raises(ConfigError, match=r"but this run uses UTF-8 bytes; pass --tokenizer"):
        T.check_same_tokenizer(w, None)
    b = tmp_path / "bytes_run"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"tokenizer": None}))
    with pytest.raises(ConfigError, match=r"holds a run tokenized with UTF-8 bytes but this run "
                       r"uses the tokenizer"):
        T.check_same_tokenizer(b, str(bpe))
    assert T.save_tokenizer(b, None) is None and not (b / "tokenizer.json").exists()
    assert isinstance(T.run_tokenizer(b), T.ByteTokenizer)
    assert T.run_tokenizer(w).sha256 == T.run_tokenizer(b, override=bpe).sha256


# ---------------------------------------------------------------------------------------------
# finetune.py end to end, and sample.py on its run


def _finetune(hf_path: Path, workdir: Path, *extra: str):
    cmd = [
        sys.executable, str(ROOT / "experiments" / "finetune.py"), f"--hf_checkpoint={hf_path}",
        "--num_stages=1", "--num_microbatches=1", "--batch_size=4", "--seq_len=16", "--steps=2",
        "--log_every=1", "--seed=5", "--learning_rate=1e-3", f"--workdir={workdir}", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, hf_dir):
    """(workdir, data directory) of a 2-step finetune.py run on a text file."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text(corpus(11))
    proc = _finetune(hf_dir, root / "run", f"--data={root / 'data' / 'corpus.txt'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr
    return root / "run", root / "data"


def test_finetune_tokenizes_text_with_the_checkpoints_tokenizer(hf_dir, finetuned):
    workdir, data_dir = finetuned
    tok = T.load_tokenizer(hf_dir / "tokenizer.json")
    (cache,) = data_dir.glob("corpus.txt.tok-*.npy")
    ids = np.load(cache)
    np.testing.assert_array_equal(ids, tok.backend.encode(corpus(11)).ids)
    # the run trained on those ids: its first loss is the checkpoint's loss on their batch
    cfg, params = hf.load_hf(str(hf_dir))
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    batch = TokenData(ids, tok.vocab_size, "c").batch(0, 4, 16, seed=5)
    np.testing.assert_allclose(first["loss"], float(M.reference_loss(cfg, params, batch)),
                               rtol=1e-5)
    bytes_batch = load_data(str(cache.with_name("corpus.txt"))).batch(0, 4, 16, seed=5)
    assert abs(first["loss"] - float(M.reference_loss(cfg, params, bytes_batch))) > 1e-3
    assert (workdir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["tokenizer"] == {"source": str(hf_dir / "tokenizer.json"), "sha256": tok.sha256}


def test_sample_encodes_and_decodes_with_the_runs_tokenizer(finetuned, sample_main):
    from experiments import sample

    workdir = finetuned[0]
    tok = T.run_tokenizer(workdir)
    prompt = "def héllo(self):"
    assert len(tok.encode(prompt)) < len(prompt.encode())  # not bytes
    code, out, err = sample_main(f"--workdir={workdir}", f"--prompt={prompt}",
                                 "--max_new_tokens=6", "--temperature=0")
    assert code == 0 and err == "", err
    cfg, params = sample.load(str(workdir), None)
    ids = sampling.generate(cfg, params, tok.encode(prompt), 6, temperature=0.0)
    assert out == prompt + tok.decode(ids) + "\n"


def test_sample_prints_ids_the_tokenizer_does_not_have(finetuned, sample_main, monkeypatch):
    workdir = finetuned[0]
    tok = T.run_tokenizer(workdir)
    monkeypatch.setattr(sampling, "generate",
                        lambda *a, **kw: np.array([65, tok.vocab_size + 1, 66]))
    code, out, err = sample_main(f"--workdir={workdir}", "--prompt=ab", "--max_new_tokens=3")
    assert code == 0
    assert out == f"ab\n65 {tok.vocab_size + 1} 66\n"
    assert err.startswith("warning: ") and f"does not have ([{tok.vocab_size + 1}])" in err
    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: np.array([65, 66]))
    code, out, err = sample_main(f"--workdir={workdir}", "--prompt=ab", "--max_new_tokens=2")
    assert code == 0 and err == "" and out == "ab" + tok.decode([65, 66]) + "\n"


def test_sample_tokenizer_errors(finetuned, sample_main, tmp_path):
    workdir = finetuned[0]
    big = train_bpe(tmp_path / "big" / "tokenizer.json", 320, added=200)
    code, out, err = sample_main(f"--workdir={workdir}", f"--tokenizer={big}")
    assert code == 2 and out == ""
    assert re.match(r"error: tokenizer .*big/tokenizer.json \(\d+ ids\) has ids up to \d+ but "
                    r"the model's vocab_size is \d+", err), err
    code, out, err = sample_main(f"--workdir={workdir}", "--tokenizer=")
    assert code == 2 and err.startswith("error: the tokenizer path is empty")
    w = Path(shutil.copytree(workdir, tmp_path / "w"))
    (w / "tokenizer.json").write_text("{")
    code, out, err = sample_main(f"--workdir={w}", "--prompt=ab")
    assert code == 2 and out == ""
    assert re.match(r"error: tokenizer .*w/tokenizer.json is not a valid tokenizer.json", err)


@pytest.mark.slow
def test_finetune_reuses_the_cache_and_refuses_another_tokenizer(hf_dir, finetuned, tmp_path):
    workdir, data_dir = finetuned
    data = f"--data={data_dir / 'corpus.txt'}"
    proc = _finetune(hf_dir, tmp_path / "run2", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from the cache" in proc.stdout
    other = train_bpe(tmp_path / "other" / "tokenizer.json", 300, seed=1)
    run = Path(shutil.copytree(workdir, tmp_path / "run"))
    proc = _finetune(hf_dir, run, data, "--steps=3", f"--tokenizer={other}")
    assert proc.returncode == 2
    assert re.match(r"error: --workdir .*run holds a run tokenized with the tokenizer", proc.stderr)
    bare = Path(shutil.copytree(hf_dir, tmp_path / "bare"))
    (bare / "tokenizer.json").unlink()
    proc = _finetune(bare, tmp_path / "run3", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^warning: .*bare has no tokenizer.json; text is tokenized as UTF-8 bytes",
                     proc.stderr, re.M)
    assert not (tmp_path / "run3" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "run3" / "config.json").read_text())["tokenizer"] is None
