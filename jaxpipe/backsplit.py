"""Splits a stage's backward pass into B (the input gradient) and W (the weight gradients).

Zero-bubble schedules run B as soon as the next stage's gradient arrives, since the previous
stage waits for its result, and W later, in what would otherwise be a bubble. The split is
made on the backward's own program (its jaxpr), so it fits any block without a hand-written
backward: B evaluates exactly the equations that the input gradient needs and hands W every
value W reads that B computed (for a matmul `y = x @ k`: the output cotangent dy; `x` is
already in the forward's stash); W evaluates the remaining equations, the weight gradients'
own matmuls and reductions. Nothing is computed twice, so B + W costs what the fused backward
costs.

A rematerialised layer (`jax.checkpoint`) is one equation of the backward, holding the
recomputed forward and the layer's whole backward. Run whole in B it would hand W finished
weight gradients, the size of the layer's weights. Such an equation is opened (its body
inlined) when the part of it that only the weight gradients need holds a matmul: B then
recomputes the forward and computes the input gradient, and W gets the recomputed matmul
inputs and the output cotangents, as without remat. Rematerialised pieces that hold no weight
matmul (a norm's statistics, attention's scores) stay whole: opening them would hand W
activation-sized values for a bias-sized gradient. Other equations that feed the input
gradient run in B whole (a `lax.cond` around a padded layer slot), their weight-gradient
outputs travelling to W as ready values.
"""

from __future__ import annotations

import jax
from jax.extend.core import DropVar, Literal, Var
from jax.extend.core.primitives import remat_p


class BackwardSplit:
    """B and W halves of `backward(free, stashed, dy) -> (dw, dh)`, traced once.

    `free` (the weights, the layer count) is passed again to W; of `stashed` (the forward's
    residual leaves, a flat list) W reads only those at `w_stashed`, so the others may be freed
    after B; `dy` (the output gradient) and whatever B computed for W travel in `carry`, a flat
    list of arrays. Build it where it is used (inside the same
    trace), with arguments of the shapes it will run with.
    """

    def __init__(self, backward, free, stashed, dy):
        closed, out_shape = jax.make_jaxpr(backward, return_shape=True)(free, stashed, dy)
        self.jaxpr, self.consts = closed.jaxpr, closed.consts
        self.in_tree = jax.tree.structure((free, stashed))
        self.dw_tree, self.dh_tree = (jax.tree.structure(x) for x in out_shape)
        n_in = len(jax.tree.leaves((free, stashed)))
        n_dw = self.dw_tree.num_leaves
        jaxpr = self.jaxpr
        self.in_vars = jaxpr.invars[:n_in]
        self.eqns, outvars = list(jaxpr.eqns), list(jaxpr.outvars)
        while True:
            self.dw_vars, self.dh_vars = outvars[:n_dw], outvars[n_dw:]
            self._cut()
            opened = self._open_remat()
            if not opened:
                break
            outvars = [_rename(v, opened) for v in outvars]
        n_free = len(jax.tree.leaves(free))
        read = {v for v in self._w_reads() if not isinstance(v, Literal)}
        self.w_stashed = tuple(
            i for i, v in enumerate(self.in_vars[n_free:]) if v in read
        )

    def _w_reads(self):
        return [v for e in self.w_eqns for v in e.invars] + list(self.dw_vars)

    def _cut(self) -> None:
        """B's and W's equations, and the values W reads that B computes (the carry)."""
        b_eqns = _needed(self.eqns, self.dh_vars)
        w_eqns = _needed(self.eqns, self.dw_vars) - b_eqns
        self.b_eqns = [self.eqns[i] for i in sorted(b_eqns)]
        self.w_eqns = [self.eqns[i] for i in sorted(w_eqns)]
        made_by_w = {v for e in self.w_eqns for v in e.outvars}
        known_to_w = set(self.in_vars) | set(self.jaxpr.constvars) | made_by_w
        self.carry_vars = list(
            dict.fromkeys(
                v for v in self._w_reads() if not isinstance(v, Literal) and v not in known_to_w
            )
        )

    def _open_remat(self) -> dict:
        """Inlines B's rematerialised equations whose weight-gradient-only part holds a matmul
        (module docstring); returns {an opened equation's output: the body's value for it}."""
        carried = set(self.carry_vars)
        b_reads = {v for e in self.b_eqns for v in e.invars if not isinstance(v, Literal)}
        b_reads |= {v for v in self.dh_vars if not isinstance(v, Literal)}
        opened, eqns = {}, []
        for e in self.eqns:
            e = e.replace(invars=[_rename(v, opened) for v in e.invars])
            if e.primitive is remat_p and _weight_matmul_only_for_w(e, carried, b_reads):
                body, outs = _inline(e)
                eqns.extend(body)
                opened.update(outs)
            else:
                eqns.append(e)
        self.eqns = eqns
        return opened

    def input_grad(self, free, stashed, dy):
        """B: (dh, carry)."""
        env = self._env(free, stashed)
        env.update(zip(self.jaxpr.invars[len(self.in_vars) :], jax.tree.leaves(dy), strict=True))
        _run(self.b_eqns, env)
        dh = jax.tree.unflatten(self.dh_tree, [_read(env, v) for v in self.dh_vars])
        return dh, [env[v] for v in self.carry_vars]

    def weight_grad(self, free, stashed_w, carry):
        """W: dw, from the same `free`, the stashed leaves at `w_stashed` and B's `carry`."""
        n_free = len(jax.tree.leaves(free))
        env = dict(zip(self.jaxpr.constvars, self.consts, strict=True))
        env.update(zip(self.in_vars[:n_free], jax.tree.leaves(free), strict=True))
        stashed_vars = [self.in_vars[n_free + i] for i in self.w_stashed]
        env.update(zip(stashed_vars, stashed_w, strict=True))
        env.update(zip(self.carry_vars, carry, strict=True))
        _run(self.w_eqns, env)
        return jax.tree.unflatten(self.dw_tree, [_read(env, v) for v in self.dw_vars])

    def _env(self, free, stashed):
        env = dict(zip(self.jaxpr.constvars, self.consts, strict=True))
        leaves = jax.tree.leaves((free, stashed))
        env.update(zip(self.in_vars, leaves, strict=True))
        return env


def _weight_matmul_only_for_w(eqn, carried, b_reads) -> bool:
    """Whether a remat equation's body has a matmul that only outputs W reads depend on."""
    body = eqn.params["jaxpr"]
    pairs = list(zip(eqn.outvars, body.outvars, strict=True))
    for_w = [u for o, u in pairs if o in carried and o not in b_reads]
    for_b = [u for o, u in pairs if o in b_reads]
    only_w = _needed(body.eqns, for_w) - _needed(body.eqns, for_b)
    return any(body.eqns[i].primitive.name == "dot_general" for i in only_w)


def _inline(eqn):
    """A remat equation's body reading the equation's inputs, and {output: body's value}.
    The body's own values get fresh names: equal layers may share one body."""
    body = eqn.params["jaxpr"]
    names = dict(zip(body.invars, eqn.invars, strict=True))
    eqns = []
    for e in body.eqns:
        fresh = [v if isinstance(v, DropVar) else Var(v.aval) for v in e.outvars]
        eqns.append(e.replace(invars=[_rename(v, names) for v in e.invars], outvars=fresh))
        names.update(zip(e.outvars, fresh, strict=True))
    outs = {o: _rename(u, names) for o, u in zip(eqn.outvars, body.outvars, strict=True)}
    return eqns, outs


def _rename(v, names):
    return v if isinstance(v, Literal) else names.get(v, v)


def _needed(eqns, outvars) -> set[int]:
    """Indices of the equations that `outvars` depend on."""
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    todo = [v for v in outvars if not isinstance(v, Literal)]
    seen_vars, needed = set(), set()
    while todo:
        v = todo.pop()
        if v in seen_vars:
            continue
        seen_vars.add(v)
        i = producer.get(v)
        if i is not None and i not in needed:
            needed.add(i)
            todo.extend(u for u in eqns[i].invars if not isinstance(u, Literal))
    return needed


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


def _run(eqns, env) -> None:
    """Evaluates equations in order into `env` (as `jax.core.eval_jaxpr` does)."""
    for e in eqns:
        with e.ctx.manager:
            out = e.primitive.bind(
                *[_read(env, v) for v in e.invars], **e.primitive.get_bind_params(e.params)
            )
        env.update(zip(e.outvars, out if e.primitive.multiple_results else [out], strict=True))
