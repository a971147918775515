"""Reading a compiled program's optimised HLO text: what runs while a `ppermute` is in flight.

XLA lowers a `ppermute` to an asynchronous pair, `collective-permute-start` and
`collective-permute-done`; whatever the scheduler places between the two in the same
computation runs while the data moves. `permute_overlap` counts, for each such pair, the
compute instructions between them (fusions, dots, convolutions, custom calls and calls into
conditionals, loops or subcomputations) and, of those, the ones that hold a matrix multiply
(a dot or convolution, directly or in a computation they call).
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")  # the first lower-case name before "(" after the type
_CALLEES = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations|true_computation|"
    r"false_computation)=\{?([%\w.\-, ]+)\}?"
)
COMPUTE_OPCODES = frozenset(
    {"fusion", "dot", "convolution", "custom-call", "conditional", "while", "call"}
)
MATMUL_OPCODES = frozenset({"dot", "convolution"})


def computations(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """HLO module text -> {computation: [(name, opcode, operands and attributes), ...]} with
    instructions in their listed order (the schedule, in a scheduled module)."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            name = _COMPUTATION.match(line) if line.rstrip().endswith("{") else None
            current = name.group(1) if name else None
            if current is not None:
                comps[current] = []
            continue
        m = _INSTRUCTION.match(line)
        if m is None or current is None:
            continue
        op = _OPCODE.search(" " + m.group(2))
        rest = m.group(2)[op.end() - 1 :] if op else ""
        comps[current].append((m.group(1), op.group(1) if op else "", rest))
    return comps


def permute_overlap(text: str) -> list[dict]:
    """One entry per `collective-permute-done`, in module order: {"computation", "compute",
    "matmul"}: compute instructions between the pair and those holding a matrix multiply.
    Both counts are None where the start lies in another computation (not counted)."""
    comps = computations(text)
    holds: dict[str, bool] = {}

    def holds_matmul(comp: str) -> bool:
        if comp not in holds:
            holds[comp] = False  # a cycle cannot hold one
            holds[comp] = any(_holds(op, rest) for _, op, rest in comps.get(comp, ()))
        return holds[comp]

    def _holds(op: str, rest: str) -> bool:
        callees = [c.strip().lstrip("%") for m in _CALLEES.finditer(rest)
                   for c in m.group(1).split(",")]
        return op in MATMUL_OPCODES or any(holds_matmul(c) for c in callees if c)

    found = []
    for comp, instrs in comps.items():
        starts = {}
        for i, (name, op, rest) in enumerate(instrs):
            if op == "collective-permute-start":
                starts[name] = i
            elif op == "collective-permute-done":
                source = re.match(r"%?([\w.\-]+)", rest).group(1)
                if source not in starts:
                    found.append({"computation": comp, "compute": None, "matmul": None})
                    continue
                between = instrs[starts[source] + 1 : i]
                found.append({
                    "computation": comp,
                    "compute": sum(op in COMPUTE_OPCODES for _, op, _ in between),
                    "matmul": sum(_holds(op, rest) for _, op, rest in between),
                })
    return found
