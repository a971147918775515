"""Hostile inputs to the model's inputs: data files, Hugging Face files, config values, sampling.

Each case gets a ConfigError (`error: ...`, exit status 2 from the scripts) naming the file or
field and the fix, or is shown to do the right thing; docs/errors.md lists them all.
"""

import builtins
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpipe import hf
from jaxpipe import model as M
from jaxpipe.checkpoint import Checkpoints
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.data import TokenData, load_data
from jaxpipe.train import TrainConfig, Trainer, lr_schedule, make_optimizer, train

ROOT = Path(__file__).resolve().parent.parent
TINY = get_preset("tiny", num_layers=2, max_seq_len=16)
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------
# --data files


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        with open(path, "wb") as f:  # np.save would append .npy to other suffixes
            np.save(f, content, allow_pickle=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    else:
        path.write_text(content)
    return path


def _npz(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.arange(10))
    return (tmp_path / "a.npz").read_bytes()


DATA_CASES = {
    # name: (file name, content (or a function of tmp_path), message pattern)
    "float npy": ("f.npy", np.array([1.7, 2.2, 3.9] * 10), r"holds float64 values; token ids"),
    "whole-number float npy": ("w.npy", np.arange(30.0), r"ids.astype\(np.int32\)"),
    "int64 ids >= 2**32": (
        "big.npy", np.array([2**32 + 5, 7] * 10), r"holds token id 4294967301, above .* 2147483647"
    ),
    "uint64 ids": ("u.npy", np.array([2**64 - 1, 3], np.uint64), r"fit in int32"),
    "complex npy": ("c.npy", np.array([1 + 2j] * 10), r"holds complex128 values"),
    "bool npy": ("b.npy", np.array([True, False] * 10), r"holds bool values"),
    "structured npy": ("s.npy", np.zeros(4, dtype=[("a", "i4")]), r"token ids must be integers"),
    "negative ids npy": ("n.npy", np.array([-1, 3] * 10), r"negative token ids \(smallest -1\)"),
    "object npy": ("o.npy", np.array([1, "a", None], dtype=object), r"allow_pickle=False"),
    "text named .npy": ("t.npy", "hello world", r"does not start with the .npy magic bytes"),
    ".npz named .npy": ("z.npy", _npz, r"does not start with the .npy magic bytes"),
    "truncated npy": ("tr.npy", lambda t: _npy_bytes(np.arange(100))[:100], r"not a readable"),
    "2-D npy": ("2d.npy", np.arange(20).reshape(4, 5), r"shape \(4, 5\); .* one flat sequence"),
    "empty npy": ("e.npy", np.zeros(0, np.int32), r"holds no tokens"),
    "odd-length bin": ("odd.bin", b"\x01\x00\x02", r"has 3 bytes, an odd number; .* uint16"),
    "empty bin": ("e.bin", b"", r"holds no tokens"),
    "directory named .bin": ("x.bin", "dir", r"is not a regular file; a .bin path must be a file"),
    "directory named .npy": ("x.npy", "dir", r"is not a regular file; a .npy path must be a file"),
    "directory without text": ("d", "dir", r"is a directory with no text files"),
}


def _npy_bytes(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_file(tmp_path, name):
    fname, content, pattern = DATA_CASES[name]
    if callable(content):
        content = content(tmp_path)
    path = _write(tmp_path, fname, content)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_data(str(path))
    assert str(path) in str(e.value)


def test_unreadable_data_file_names_path_and_reason(tmp_path, monkeypatch):
    """Permission denied, simulated so that it applies when the tests run as root."""
    real_open = builtins.open
    paths = [_write(tmp_path, n, c) for n, c in
             [("a.txt", "abc"), ("a.npy", np.arange(9)), ("a.bin", b"\x01\x00")]]

    def deny(file, *a, **kw):
        if str(file) in map(str, paths):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    monkeypatch.setattr(Path, "read_bytes", lambda p: deny(p).read())
    for path in paths:
        with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)") as e:
            load_data(str(path))
        assert str(path) in str(e.value)


def test_empty_data_flag_is_refused_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--data=` used to read every text file under "."
    (tmp_path / "notes.txt").write_text("unrelated text " * 20)
    with pytest.raises(ConfigError, match=r"--data must name a file or directory, got ''"):
        load_data("")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_file_as_data_is_refused_not_read_forever():
    with pytest.raises(ConfigError, match=r"'/dev/zero' is not a regular file"):
        load_data("/dev/zero")


def test_valid_ids_are_kept_exactly(tmp_path):
    ids = np.array([0, 5, 2**31 - 1, 3] * 8, np.int64)
    np.save(tmp_path / "ids.npy", ids)
    d = load_data(str(tmp_path / "ids.npy"))
    assert d.tokens.dtype == np.int32 and np.array_equal(d.tokens, ids)
    be = np.arange(40, dtype=">u2")  # big-endian ids convert by value
    _write(tmp_path, "be.NPY", be)  # the suffix is matched case-insensitively
    assert np.array_equal(load_data(str(tmp_path / "be.NPY")).tokens, np.arange(40))
    np.arange(40, dtype="<u2").tofile(tmp_path / "ids.bin")
    assert load_data(str(tmp_path / "ids.bin")).vocab_size == 40


def test_non_utf8_text_is_read_as_bytes(tmp_path):
    raw = bytes(range(128, 256)) + "é".encode("latin-1")
    (tmp_path / "latin.txt").write_bytes(raw)
    d = load_data(str(tmp_path / "latin.txt"))
    assert bytes(d.tokens.astype(np.uint8)) == raw and d.vocab_size == 256


def test_text_is_capped_at_max_bytes_without_reading_more(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    assert len(load_data(str(tmp_path / "a.txt"), max_bytes=100).tokens) == 100


def _trainer(model=TINY):
    pcfg = PipelineConfig(num_stages=1, num_microbatches=1)
    tcfg = TrainConfig(steps=1, batch_size=2, seq_len=8)
    return Trainer.create(model, pcfg, tcfg, devices=jax.devices()[:1])


def test_one_step_run_trains():
    """--steps 1 (shorter than the warmup) was an optax ValueError about decay_steps."""
    tcfg = TrainConfig(steps=1, batch_size=2, seq_len=8)
    assert float(lr_schedule(tcfg)(0)) == 0.0 and make_optimizer(tcfg) is not None


def test_ids_equal_to_vocab_size_are_refused():
    ids = np.arange(257, dtype=np.int32)  # 256 == vocab_size: one past the last embedding row
    with pytest.raises(ConfigError, match="token ids up to 256 but the model's vocab_size is 256"):
        train(_trainer(), TokenData(ids, 257, "ids"))


# ---------------------------------------------------------------------------------------------
# Config values (the library API and the flags that build them)

CONFIG_CASES = {
    "boundary_dtype int8": (
        lambda: PipelineConfig(boundary_dtype="int8"),
        r"boundary_dtype 'int8' is not supported; .* \('float32', 'bfloat16', 'float16'\)",
    ),
    "boundary_dtype foo": (lambda: PipelineConfig(boundary_dtype="foo"), "boundary_dtype 'foo'"),
    "boundary_dtype float64": (
        lambda: PipelineConfig(boundary_dtype="float64"), "boundary_dtype 'float64'"
    ),
    "model dtype int8": (lambda: TINY.replace(dtype="int8"), r"dtype 'int8' is not supported"),
    "model dtype bogus": (lambda: get_preset("tiny", dtype="bogus"), r"dtype 'bogus'"),
    "bool stages": (lambda: PipelineConfig(num_stages=True), "num_stages must be a positive"),
    "float micro-batches": (
        lambda: PipelineConfig(num_microbatches=2.0), "num_microbatches must be a positive"
    ),
    "bool layers": (lambda: TINY.replace(num_layers=True), "num_layers must be >= 1, got True"),
    "float vocab": (lambda: TINY.replace(vocab_size=256.0), "vocab_size must be >= 1, got 256.0"),
    "string vocab": (lambda: TINY.replace(vocab_size="abc"), "vocab_size must be >= 1, got 'abc'"),
    "negative vocab override": (
        lambda: get_preset("tiny", vocab_size=-3), "vocab_size must be >= 1, got -3"
    ),
    "zero layers override": (
        lambda: get_preset("tiny", num_layers=0), "num_layers must be >= 1, got 0"
    ),
    "zero kv heads": (lambda: TINY.replace(num_kv_heads=0), "num_kv_heads must be None .* got 0"),
    "zero d_ff": (lambda: TINY.replace(d_ff=0), r"d_ff must be None \(the default\) or >= 1"),
    "negative d_ff": (lambda: TINY.replace(d_ff=-5), "d_ff must be None .* got -5"),
    "tie_embeddings 1": (lambda: TINY.replace(tie_embeddings=1), "tie_embeddings must be None"),
    "nan rope_theta": (lambda: TINY.replace(rope_theta=NAN), "rope_theta must be a finite"),
    "inf norm_eps": (lambda: TINY.replace(norm_eps=INF), "norm_eps must be a finite number > 0"),
    "zero norm_eps": (lambda: TINY.replace(norm_eps=0.0), "norm_eps must be a finite number > 0"),
    "seed -1": (lambda: TrainConfig(seed=-1), r"seed must be an integer from 0 to 4294967295"),
    "seed 2**32": (lambda: TrainConfig(seed=2**32), r"got 4294967296; pass e.g. --seed 0"),
    "init_params seed -1": (lambda: M.init_params(TINY, -1), r"pass e.g. seed=0"),
    "zero seq_len": (lambda: TrainConfig(seq_len=0), "seq_len must be >= 1, got 0"),
    "float steps": (lambda: TrainConfig(steps=2.5), "steps must be an integer, got 2.5"),
    "bool batch": (lambda: TrainConfig(batch_size=True), "batch_size must be an integer"),
    "nan grad_clip": (lambda: TrainConfig(grad_clip=NAN), "grad_clip must be a finite number > 0"),
    "inf weight_decay": (lambda: TrainConfig(weight_decay=INF), "weight_decay must be a finite"),
    "negative min_lr_ratio": (
        lambda: TrainConfig(min_lr_ratio=-1.0), "min_lr_ratio must be a finite number >= 0"
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_value(name):
    fn, pattern = CONFIG_CASES[name]
    with pytest.raises(ConfigError, match=pattern):
        fn()


def test_valid_dtypes_and_seeds_still_work():
    PipelineConfig(boundary_dtype="bfloat16")
    TINY.replace(dtype="float16", num_layers=np.int64(2))  # numpy integers are integers
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (experiments/finetune.py)

HF_CFG = get_preset("tiny", num_layers=2, max_seq_len=16, d_model=16, num_heads=2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A valid single-file and a valid sharded tiny GPT-2 checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: 0.02 * rng.standard_normal(a.shape, np.float32), M.abstract_params(HF_CFG)
    )
    hf.save_hf(HF_CFG, params, str(root / "single"))
    files = hf.save_hf(HF_CFG, params, str(root / "sharded"), max_shard_bytes=4_000)
    assert hf.INDEX_NAME in files and len(files) > 3
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _edit_config(path: Path, fn):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(fn(cfg)))


def _first_shard(path: Path) -> Path:
    return sorted(path.glob("model-*.safetensors"))[0]


HF_CASES = {
    # name: (which checkpoint, corruption of the copied directory, message pattern)
    "malformed JSON": (
        "single", lambda p: (p / "config.json").write_text('{"model_type": "gpt2",'),
        r"config.json is not valid JSON",
    ),
    "JSON list": (
        "single", lambda p: (p / "config.json").write_text("[1, 2]"),
        r"config.json holds a JSON list, not an object",
    ),
    "config not UTF-8": (
        "single", lambda p: (p / "config.json").write_bytes(b'{"a": "\xff\xfe"}'),
        r"config.json is not valid JSON",
    ),
    "vocab_size abc": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "vocab_size": "abc"}),
        r"config.json field vocab_size='abc' must be a positive integer",
    ),
    "zero layers": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "n_layer": 0}),
        r"field n_layer=0 must be a positive integer",
    ),
    "bool width": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "n_embd": True}),
        r"field n_embd=True must be a positive integer",
    ),
    "nan epsilon": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "layer_norm_epsilon": NAN}),
        r"field layer_norm_epsilon=nan must be a finite number > 0",
    ),
    "string tie flag": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "tie_word_embeddings": "yes"}),
        r"field tie_word_embeddings='yes' must be true or false",
    ),
    "unsupported architecture": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "model_type": "bert"}),
        r"model_type 'bert' is not supported; jaxpipe.hf reads 'gpt2' and 'llama'",
    ),
    "heads do not divide width": (
        "single", lambda p: _edit_config(p, lambda c: {**c, "n_head": 3}),
        r"config.json: d_model 16 is not divisible by num_heads 3",
    ),
    "garbage safetensors": (
        "single", lambda p: (p / "model.safetensors").write_bytes(b"garbage" * 20),
        r"model.safetensors is not a valid safetensors file .*download it again",
    ),
    "truncated safetensors": (
        "single",
        lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:-100]
        ),
        r"model.safetensors is not a valid safetensors file",
    ),
    "NaN weights": ("single", lambda p: _nan_weights(p), r"holds NaN or infinite values"),
    "missing shard": (
        "sharded", lambda p: _first_shard(p).unlink(),
        r"model-00001-of-\d{5}.safetensors is missing; the checkpoint is incomplete",
    ),
    "truncated shard": (
        "sharded", lambda p: _first_shard(p).write_bytes(_first_shard(p).read_bytes()[:50]),
        r"model-00001-of-\d{5}.safetensors is not a valid safetensors file",
    ),
    "malformed index": (
        "sharded", lambda p: (p / hf.INDEX_NAME).write_text("{"),
        r"model.safetensors.index.json is not valid JSON",
    ),
    "index without weight_map": (
        "sharded", lambda p: (p / hf.INDEX_NAME).write_text('{"metadata": {}}'),
        r"has no \"weight_map\" object",
    ),
    "shard outside the directory": (
        "sharded",
        lambda p: (p / hf.INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}})),
        r"names shard '/etc/passwd', which is not a file name in",
    ),
}


def _nan_weights(path: Path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.nan
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", list(HF_CASES))
def test_malformed_hf_checkpoint(hf_dirs, tmp_path, name):
    which, corrupt, pattern = HF_CASES[name]
    path = _copy(hf_dirs / which, tmp_path / which)
    hf.load_hf(str(path))  # the copy is valid before the corruption
    corrupt(path)
    with pytest.raises(ConfigError, match=pattern) as e:
        hf.load_hf(str(path))
    assert str(path) in str(e.value)


def test_unreadable_hf_config(hf_dirs, monkeypatch):
    real_open = builtins.open
    cfg_path = str(hf_dirs / "single" / "config.json")

    def deny(file, *a, **kw):
        if str(file) == cfg_path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(ConfigError, match=r"cannot read .*config.json \(Permission denied\)"):
        hf.load_hf(str(hf_dirs / "single"))


def _run(script, *args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "corrupt, extra, message",
    [
        (lambda p: (p / "config.json").write_text("[1]"), [], "holds a JSON list"),
        (lambda p: None, ["--num_layers=2"], "--num_layers cannot change a Hugging Face"),
    ],
    ids=["JSON list", "--num_layers"],
)
def test_finetune_flag_path(hf_dirs, tmp_path, corrupt, extra, message):
    path = _copy(hf_dirs / "single", tmp_path / "hf")
    corrupt(path)
    done = _run(
        "finetune.py", f"--hf_checkpoint={path}", "--num_stages=1", "--num_microbatches=1",
        "--batch_size=2", "--seq_len=8", "--steps=1", f"--workdir={tmp_path / 'run'}", *extra,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {path}" in done.stderr or "error: --num_layers" in done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    run = tmp_path / "run"  # checked and created up front, refused before anything was written
    assert not run.exists() or not any(run.iterdir())


# ---------------------------------------------------------------------------------------------
# experiments/sample.py


@pytest.fixture(scope="module")
def sample_workdir(tmp_path_factory):
    """A workdir with checkpoints 2 and 4 of a tiny model whose vocabulary is 100 ids."""
    workdir = tmp_path_factory.mktemp("sample")
    trainer = _trainer(TINY.replace(vocab_size=100))
    state = trainer.init_state()
    with Checkpoints(workdir) as c:
        for step in (2, 4):
            c.save(trainer, state.replace(step=state.step + step), force=True)
    return workdir


SAMPLE_CASES = [
    (["--step=999"], r"no checkpoint of step 999 in .*checkpoints; its steps are \[2, 4\]"),
    (["--step=-1"], r"no checkpoint of step -1 .* its steps are \[2, 4\]"),
    (["--max_new_tokens=-5"], "max_new_tokens must be >= 1, got -5"),
    (["--max_new_tokens=0"], "max_new_tokens must be >= 1, got 0"),
    (["--temperature=nan"], r"temperature must be finite and >= 0 \(0: greedy\), got nan"),
    (["--temperature=inf"], "temperature must be finite and >= 0"),
    (["--temperature=-1"], "temperature must be finite and >= 0"),
    (["--seed=-1"], "seed must be an integer from 0 to 4294967295"),
    (["--top_k=-1"], r"top_k must be >= 0 \(0: no limit\), got -1"),
    (["--top_k=101", "--prompt=ab"], r"top_k 101 exceeds .* 100 ids; pass --top_k <= 100"),
    (["--prompt=héllo"], r"the prompt holds token id 195 but the model's vocabulary has ids 0"),
    (["--prompt="], r"the prompt is 0 tokens; it must be 1 to 15"),
    (["extra"], r"unexpected arguments \['extra'\]"),
]


@pytest.mark.parametrize("args, message", SAMPLE_CASES, ids=[c[0][0] for c in SAMPLE_CASES])
def test_sample_flag_errors(sample_workdir, sample_main, args, message):
    code, out, err = sample_main(f"--workdir={sample_workdir}", *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert out == ""


def test_sample_corrupt_explicit_step(sample_workdir, sample_main, tmp_path):
    import shutil

    workdir = Path(shutil.copytree(sample_workdir, tmp_path / "w"))
    (workdir / "checkpoints" / "2" / "meta" / "metadata").write_text("{truncated")
    code, out, err = sample_main(f"--workdir={workdir}", "--step=2")
    assert code == 2 and out == "", err
    assert re.match(r"error: checkpoint .*checkpoints/2 cannot be used: metadata unreadable", err)


def test_top_k_one_is_greedy_and_top_k_vocab_is_plain_sampling(sample_workdir):
    from experiments import sample
    from jaxpipe import sampling

    cfg, params = sample.load(str(sample_workdir), None)
    prompt = np.array([1, 2, 3])
    greedy = sampling.generate(cfg, params, prompt, 8, temperature=0.0)
    compiled = sampling._decode._cache_size()
    hot = sampling.generate(cfg, params, prompt, 8, temperature=5.0, seed=3)
    assert not np.array_equal(hot, greedy)  # a hot sample wanders off the greedy path
    np.testing.assert_array_equal(
        sampling.generate(cfg, params, prompt, 8, temperature=5.0, seed=3, top_k=1), greedy
    )
    np.testing.assert_array_equal(
        sampling.generate(cfg, params, prompt, 8, temperature=5.0, seed=3, top_k=100), hot
    )
    assert sampling._decode._cache_size() == compiled  # top_k and temperature do not recompile


def test_sample_caps_tokens_with_a_warning(sample_workdir, sample_main):
    code, out, err = sample_main(
        f"--workdir={sample_workdir}", "--prompt=abc", "--max_new_tokens=50", "--temperature=0"
    )
    assert code == 0, err
    assert "warning: generating 13 tokens, not --max_new_tokens 50" in err
    assert len(out.rstrip("\n").encode("utf-8", "surrogateescape")) >= 3
    code, out, err = sample_main(f"--workdir={sample_workdir}", "--step=2", "--prompt=abc",
                                 "--max_new_tokens=2", "--temperature=0")
    assert code == 0 and err == "", err


def test_sample_prints_ids_that_are_not_bytes(sample_workdir, sample_main, monkeypatch):
    """A model with more than 256 ids (a fine-tuned GPT-2) may generate non-bytes: they are
    printed as ids with a warning, not folded into bytes modulo 256."""
    from jaxpipe import sampling

    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: np.array([65, 300, 66]))
    code, out, err = sample_main(f"--workdir={sample_workdir}", "--prompt=ab",
                                 "--max_new_tokens=3")
    assert code == 0, err
    assert out == "ab\n65 300 66\n" and "token ids above 255" in err
