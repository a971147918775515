"""Decode speed with the KV cache against the cache-free loop, printed as JSON.

    PYTHONPATH=. JAX_PLATFORMS=cpu python experiments/bench_generate.py [--model small]
        [--new_tokens 256] [--prompt_len 16] [--reps 3]

Both generate --new_tokens greedy tokens after the same prompt with the same random parameters
(the preset with max_seq_len = prompt_len + new_tokens); the first call of each compiles and is
not timed; the best of --reps timed calls counts. Keys: cached_tokens_per_s,
uncached_tokens_per_s, speedup (cached / uncached), same_tokens (greedy outputs equal).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxpipe.config import get_preset
from jaxpipe.model import init_params
from jaxpipe.sampling import generate, generate_uncached


def bench(model: str, new_tokens: int, prompt_len: int, reps: int) -> dict:
    cfg = get_preset(model, max_seq_len=prompt_len + new_tokens)
    params = init_params(cfg, 0)
    prompt = np.arange(prompt_len) % cfg.vocab_size
    out, rate = {}, {}
    for name, fn in (("cached", generate), ("uncached", generate_uncached)):
        out[name] = fn(cfg, params, prompt, new_tokens)  # compiles
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(cfg, params, prompt, new_tokens)
            best = min(best, time.perf_counter() - t0)
        rate[name] = new_tokens / best
    return {
        "model": model,
        "new_tokens": new_tokens,
        "prompt_len": prompt_len,
        "cached_tokens_per_s": round(rate["cached"], 1),
        "uncached_tokens_per_s": round(rate["uncached"], 1),
        "speedup": round(rate["cached"] / rate["uncached"], 2),
        "same_tokens": bool(np.array_equal(out["cached"], out["uncached"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(bench(args.model, args.new_tokens, args.prompt_len, args.reps), indent=1))


if __name__ == "__main__":
    main()
