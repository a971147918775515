"""KV-cache generation against the cache-free loop; sampling options and their errors."""

import jax
import numpy as np
import pytest

from jaxpipe import model as M
from jaxpipe.config import ConfigError, get_preset
from jaxpipe.sampling import _pick, generate, generate_uncached


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def model(request):
    cfg = get_preset(request.param, max_seq_len=32)
    params = M.init_params(cfg, 3)
    # Sharpen the random model so that greedy decoding is far from ties.
    params["embed"]["tok"] = params["embed"]["tok"] * 8.0
    return cfg, params


def test_cached_greedy_equals_uncached_greedy(model):
    cfg, params = model
    prompt = [5, 17, 42, 99, 3]
    cached = generate(cfg, params, prompt, 20)
    assert cached.shape == (20,) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached, generate_uncached(cfg, params, prompt, 20))
    # Asking past the model's positions stops at them.
    long = generate(cfg, params, prompt, 100)
    assert len(long) == cfg.max_seq_len - len(prompt)
    np.testing.assert_array_equal(long[:20], cached)


def test_cached_logits_equal_the_full_forward(model):
    """Every position's logits from prefill + cached steps equal the whole-sequence forward."""
    cfg, params = model
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)
    full = M.head_apply(
        cfg, params, M.stack_forward(cfg, params["blocks"], M.embed_apply(cfg, params, tokens))
    )
    L, S, G, K = cfg.num_layers, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim
    zeros = np.zeros((L, 1, S, G, K), np.float32)
    x = M.embed_apply(cfg, params, tokens[:, :4])
    x, cache = M.stack_decode(cfg, params["blocks"], x, (zeros, zeros), 0)
    got = [M.head_apply(cfg, params, x)]
    for i in range(4, 9):
        x = M.embed_apply(cfg, params, tokens[:, i : i + 1], i)
        x, cache = M.stack_decode(cfg, params["blocks"], x, cache, i)
        got.append(M.head_apply(cfg, params, x))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-4, rtol=2e-4)


def test_sampling_is_seeded_and_top_k_restricts_the_choice(model):
    cfg, params = model
    a = generate(cfg, params, [7, 8], 12, temperature=1.5, seed=1)
    assert np.array_equal(a, generate(cfg, params, [7, 8], 12, temperature=1.5, seed=1))
    assert not np.array_equal(a, generate(cfg, params, [7, 8], 12, temperature=1.5, seed=2))
    # top_k = 1 is greedy whatever the temperature.
    np.testing.assert_array_equal(
        generate(cfg, params, [7, 8], 12, temperature=5.0, top_k=1, seed=4),
        generate(cfg, params, [7, 8], 12),
    )


def test_pick_top_k_only_draws_among_the_k_largest():
    logits = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    seen = {
        int(_pick(logits, np.float32(100.0), np.int32(2), jax.random.key(s))) for s in range(200)
    }
    assert seen == {1, 3}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt_ids=[], max_new_tokens=4), "the prompt is 0 tokens"),
        (dict(prompt_ids=[1] * 32, max_new_tokens=4), "the prompt is 32 tokens"),
        (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(prompt_ids=[1], max_new_tokens=-5), "max_new_tokens must be >= 1"),
        (dict(prompt_ids=[1], max_new_tokens=4, seed=-1), "seed must be an integer from 0"),
        (dict(prompt_ids=[300], max_new_tokens=4), "the prompt holds token id 300"),
        (dict(prompt_ids=[1], max_new_tokens=4, temperature=float("nan")), "temperature"),
        (dict(prompt_ids=[1], max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(prompt_ids=[1], max_new_tokens=4, top_k=-1), "top_k must be >= 0"),
        (dict(prompt_ids=[1], max_new_tokens=4, top_k=257), "top_k 257 exceeds"),
    ],
)
def test_bad_generation_arguments(kwargs, match):
    cfg = get_preset("tiny", max_seq_len=32)
    with pytest.raises(ConfigError, match=match):
        generate(cfg, None, **kwargs)
