"""Splits a stage's backward pass into B (the input gradient) and W (the weight gradients).

Zero-bubble schedules run B as soon as the next stage's gradient arrives, since the previous
stage waits for its result, and W later, in what would otherwise be a bubble. The split is
made on the backward's own program (its jaxpr), so it fits any block without a hand-written
backward: B evaluates exactly the equations that the input gradient needs and hands W every
value W reads that B computed (for a matmul `y = x @ k`: the output cotangent dy; `x` is
already in the forward's stash); W evaluates the remaining equations, the weight gradients'
own matmuls and reductions. Nothing is computed twice, so B + W costs what the fused backward
costs.

Two kinds of equation hold a whole layer's backward, and B would run them whole, handing W
finished weight gradients (the size of the layer's weights) and leaving W no matmul:
- A rematerialised layer (`jax.checkpoint`): its body holds the recomputed forward and the
  layer's backward. It is opened (the body inlined) when the part of it that only the weight
  gradients need holds a matmul: B then recomputes the forward and computes the input
  gradient, and W gets the recomputed matmul inputs and the output cotangents, as without
  remat. Rematerialised pieces that hold no weight matmul (a norm's statistics, attention's
  scores) stay whole: opening them would hand W activation-sized values for a bias-sized
  gradient.
- A conditional (`lax.cond` around a padded layer slot of an uneven layout): each branch is
  split the same way (recursively, so a rematerialised layer inside a branch opens too), and
  the equation becomes two conditionals on the same predicate: one in B, computing the
  branch's input gradient and what its W needs, and one in W, computing its weight
  gradients. A branch's carry is zeros when another branch runs (the padded slot's branch
  hands W nothing).
"""

from __future__ import annotations

import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
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
        known = set(self.in_vars) | set(jaxpr.constvars)
        outs = list(jaxpr.outvars)
        cut = _split(list(jaxpr.eqns), known, outs[n_dw:], outs[:n_dw])
        self.b_eqns, self.w_eqns, self.carry_vars, self.dh_vars, self.dw_vars = cut
        n_free = len(jax.tree.leaves(free))
        read = set(_reads(self.w_eqns, self.dw_vars))
        self.w_stashed = tuple(
            i for i, v in enumerate(self.in_vars[n_free:]) if v in read
        )
        self.carry_near = _nearest_inputs(self.b_eqns, self.carry_vars, self.in_vars[n_free:])

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


class _Cut(NamedTuple):
    b_eqns: list
    w_eqns: list
    carry: list  # the values W reads that B computes
    b_outs: list
    w_outs: list


def _split(eqns, known, b_outs, w_outs) -> _Cut:
    """Cuts `eqns` into B's (what `b_outs` need) and W's (the rest of what `w_outs` need),
    opening rematerialised equations and splitting conditionals in B until none is left to
    open. `known`: the variables W has without B (inputs, constants). The outputs come back
    renamed where an opened equation made them."""
    while True:
        b_eqns, w_eqns, carry = _cut(eqns, known, b_outs, w_outs)
        eqns, opened = _open(eqns, b_eqns, carry, b_outs)
        if opened is None:
            return _Cut(b_eqns, w_eqns, carry, b_outs, w_outs)
        b_outs = [_rename(v, opened) for v in b_outs]
        w_outs = [_rename(v, opened) for v in w_outs]


def _cut(eqns, known, b_outs, w_outs):
    b_idx = _needed(eqns, b_outs)
    w_idx = _needed(eqns, w_outs) - b_idx
    b_eqns = [eqns[i] for i in sorted(b_idx)]
    w_eqns = [eqns[i] for i in sorted(w_idx)]
    known_to_w = set(known) | {v for e in w_eqns for v in e.outvars}
    carry = list(dict.fromkeys(v for v in _reads(w_eqns, w_outs) if v not in known_to_w))
    return b_eqns, w_eqns, carry


def _open(eqns, b_eqns, carry, b_outs):
    """Opens B's equations that hold a weight matmul only W needs (module docstring): returns
    (the new equations, {an inlined equation's output: the body's value for it}), or
    (eqns, None) when nothing opens."""
    carried = set(carry)
    b_reads = set(_reads(b_eqns, b_outs))
    opened, new, changed = {}, [], False
    for e in eqns:
        e = e.replace(invars=[_rename(v, opened) for v in e.invars])
        if e.primitive is remat_p and _weight_matmul_only_for_w(e, carried, b_reads):
            body, outs = _inline(e)
            new.extend(body)
            opened.update(outs)
            changed = True
        elif e.primitive.name == "cond" and (pieces := _CondPiece.split(e, carried, b_reads)):
            new.extend(pieces)
            changed = True
        else:
            new.append(e)
    return new, (opened if changed else None)


def _reads(eqns, outs):
    """The variables (not literals) that `eqns` read, then `outs`."""
    vs = [v for e in eqns for v in e.invars] + list(outs)
    return [v for v in vs if not isinstance(v, Literal)]


def _weight_matmul_only_for_w(eqn, carried, b_reads) -> bool:
    """Whether a remat equation's body has a matmul that only outputs W reads depend on."""
    body = eqn.params["jaxpr"]
    pairs = list(zip(eqn.outvars, body.outvars, strict=True))
    for_w = [u for o, u in pairs if o in carried and o not in b_reads]
    for_b = [u for o, u in pairs if o in b_reads]
    only_w = _needed(body.eqns, for_w) - _needed(body.eqns, for_b)
    return any(body.eqns[i].primitive.name == "dot_general" for i in only_w)


def _has_matmul(eqns) -> bool:
    for e in eqns:
        if e.primitive.name == "dot_general" or getattr(e, "matmul", False):
            return True
        if any(_has_matmul(j.eqns) for j in jax.extend.core.jaxprs_in_params(e.params)):
            return True
    return False


class _CondPiece:
    """One half (B's or W's) of a split conditional: an equation-like object (`invars`,
    `outvars`, `ctx`) that `_run` evaluates with `lax.switch` on the conditional's index."""

    primitive = types.SimpleNamespace(name="split_cond", multiple_results=True)

    def __init__(self, eqn, invars, outvars, branches, matmul):
        self.eqn, self.invars, self.outvars, self.branches = eqn, invars, outvars, branches
        self.ctx, self.params, self.matmul = eqn.ctx, {}, matmul

    def replace(self, invars):
        return _CondPiece(self.eqn, invars, self.outvars, self.branches, self.matmul)

    @classmethod
    def split(cls, eqn, carried, b_reads):
        """(B's piece, W's piece) of a conditional whose W-only outputs need a matmul in some
        branch, or None. Outputs B reads stay with B; those only W reads go to W."""
        to_w = [o in carried and o not in b_reads for o in eqn.outvars]
        if not any(to_w):
            return None
        index, ops = eqn.invars[0], eqn.invars[1:]
        cuts = []
        for branch in eqn.params["branches"]:
            j = branch.jaxpr
            b_outs = [u for u, w in zip(j.outvars, to_w, strict=True) if not w]
            w_outs = [u for u, w in zip(j.outvars, to_w, strict=True) if w]
            known = set(j.invars) | set(j.constvars)
            cuts.append((branch, _split(list(j.eqns), known, b_outs, w_outs)))
        if not any(_has_matmul(cut.w_eqns) for _, cut in cuts):
            return None
        # Operands some branch's W reads; carries of every branch, in branch order.
        w_read = set().union(*(_reads(cut.w_eqns, cut.w_outs) for _, cut in cuts))
        w_ops = [i for i in range(len(ops)) if any(b.jaxpr.invars[i] in w_read for b, _ in cuts)]
        carries = [[Var(v.aval) for v in cut.carry] for _, cut in cuts]
        flat = [v for c in carries for v in c]

        def b_fn(k):
            branch, cut = cuts[k]

            def run(*vals):
                env = _branch_env(branch, branch.jaxpr.invars, vals)
                _run(cut.b_eqns, env)
                out = [_read(env, v) for v in cut.b_outs]
                for i, cs in enumerate(carries):
                    out += [env[v] for v in cut.carry] if i == k else [_zeros(v.aval) for v in cs]
                return out

            return run

        def w_fn(k):
            branch, cut = cuts[k]
            start = len(w_ops) + sum(len(c) for c in carries[:k])

            def run(*vals):
                invars = [branch.jaxpr.invars[i] for i in w_ops]
                env = _branch_env(branch, invars, vals[: len(w_ops)])
                env.update(zip(cut.carry, vals[start : start + len(cut.carry)], strict=True))
                _run(cut.w_eqns, env)
                return [_read(env, v) for v in cut.w_outs]

            return run

        n = len(cuts)
        b_out = [o for o, w in zip(eqn.outvars, to_w, strict=True) if not w]
        w_out = [o for o, w in zip(eqn.outvars, to_w, strict=True) if w]
        b_matmul = any(_has_matmul(cut.b_eqns) for _, cut in cuts)
        b_piece = cls(eqn, [index, *ops], b_out + flat, [b_fn(k) for k in range(n)], b_matmul)
        w_piece = cls(eqn, [index, *(ops[i] for i in w_ops), *flat], w_out,
                      [w_fn(k) for k in range(n)], True)
        return b_piece, w_piece

    def run(self, index, *vals):
        return jax.lax.switch(index, self.branches, *vals)


def _branch_env(branch, invars, vals):
    env = dict(zip(branch.jaxpr.constvars, branch.consts, strict=True))
    env.update(zip(invars, vals, strict=True))
    return env


def _zeros(aval):
    z = jnp.zeros(aval.shape, aval.dtype)
    axes = tuple(getattr(getattr(aval, "mat", None), "varying", ()))
    return jax.lax.pcast(z, axes, to="varying") if axes else z


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


def _nearest_inputs(eqns, outvars, invars) -> list[tuple[int, ...]]:
    """For each of `outvars`, the indices of the `invars` it depends on through `eqns`, nearest
    (fewest equations between them) first."""
    producer = {v: e for e in eqns for v in e.outvars}
    index = {v: i for i, v in enumerate(invars)}
    near = []
    for out in outvars:
        found, frontier, seen = [], [out], {out}
        while frontier:
            found += [index[v] for v in frontier if v in index]
            nxt = []
            for v in frontier:
                e = producer.get(v)
                for u in () if e is None else e.invars:
                    if not isinstance(u, Literal) and u not in seen:
                        seen.add(u)
                        nxt.append(u)
            frontier = nxt
        near.append(tuple(found))
    return near


def _read(env, v):
    return v.val if isinstance(v, Literal) else env[v]


def _run(eqns, env) -> None:
    """Evaluates equations in order into `env` (as `jax.core.eval_jaxpr` does); a split
    conditional's pieces run their own `lax.switch`."""
    for e in eqns:
        vals = [_read(env, v) for v in e.invars]
        with e.ctx.manager:
            if isinstance(e, _CondPiece):
                out = e.run(*vals)
            else:
                out = e.primitive.bind(*vals, **e.primitive.get_bind_params(e.params))
        env.update(zip(e.outvars, out if e.primitive.multiple_results else [out], strict=True))
