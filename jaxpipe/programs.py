"""Forward + backward programs of one virtual stage or one layer at one micro-batch.

Built on small concrete parameters so that they can run on the host: the calibration of the
`cpu` profile (`costs`) and the measured layer and stage times (`measure`) time the same
programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpipe import model as M
from jaxpipe.config import ModelConfig


def _concrete(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [0.02 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def stage_program(cfg: ModelConfig, blocks: int, first: bool, last: bool, remat: bool = False):
    """Forward + backward of one virtual stage: [embed] -> `blocks` blocks -> [head + loss];
    with `remat`, each block recomputed in the backward (remat="layer")."""
    block = M.block_fn(cfg, "layer" if remat else "none")

    def loss(p, inp, tgt, cot):
        h = M.embed_apply(cfg, p, inp) if first else inp
        for j in range(blocks):
            h = block(jax.tree.map(lambda a, j=j: a[j], p["blocks"]), h)
        if last:
            return M.head_loss(cfg, p, h, tgt)
        return jnp.vdot(h.astype(jnp.float32), cot.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1) if not first else 0))


class ProgramInputs:
    def __init__(self, cfg: ModelConfig, b: int, T: int, max_blocks: int, seed: int = 0):
        small = cfg.replace(num_layers=max_blocks)
        key = jax.random.key(seed)
        self.params = _concrete(M.abstract_params(small), key)
        self.tokens = jax.random.randint(key, (b, T), 0, cfg.vocab_size)
        self.x = 0.1 * jax.random.normal(key, (b, T, cfg.d_model), jnp.dtype(cfg.dtype))

    def args(self, blocks: int, first: bool, last: bool, tied: bool):
        """Only the parameters the stage uses (unused ones would get zero gradients)."""
        p = {"blocks": jax.tree.map(lambda a: a[:blocks], self.params["blocks"])}
        if first or (last and tied):
            p["embed"] = self.params["embed"]
        if last:
            p["head"] = self.params["head"]
        return p, (self.tokens if first else self.x), self.tokens, self.x


def layer_programs(model_cfg: ModelConfig, microbatch: int, seq_len: int) -> dict[str, tuple]:
    """{kind: (jitted fwd + bwd program, args)} at one micro-batch: "block" is one block,
    "embed" the embedding + one block, "head" one block + the head and loss (a layer's time is
    its program's minus the block's), "block_remat" one block recomputed in its backward."""
    inp = ProgramInputs(model_cfg, microbatch, seq_len, 1)
    kinds = {"block": (1, False, False), "embed": (1, True, False), "head": (1, False, True)}
    programs = {
        k: (stage_program(model_cfg, *key), inp.args(*key, model_cfg.tied))
        for k, key in kinds.items()
    }
    remat = stage_program(model_cfg, 1, False, False, remat=True)
    programs["block_remat"] = (remat, programs["block"][1])
    return programs
