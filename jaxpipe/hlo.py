"""Reading a compiled program's optimised HLO: XLA's dump files, and what runs while a
`ppermute` is in flight.

`dump_options(dir)` makes a compile write its HLO before and after optimisation and its buffer
reports into `dir` (`xla_dump_to`); `optimized_hlo(dir)` reads the optimised module back and
`largest_buffers(dir)` the biggest entries of the memory-usage report. The compiler writes
both even when the program does not fit (a TPU compile that runs out of memory).

XLA lowers a `ppermute` to an asynchronous pair, `collective-permute-start` and
`collective-permute-done`; whatever the scheduler places between the two in the same
computation runs while the data moves. `permute_overlap` counts, for each such pair, the
compute instructions between them (fusions, dots, convolutions, custom calls and calls into
conditionals, loops or subcomputations) and, of those, the ones that hold a matrix multiply
(a dot or convolution, directly or in a computation they call).
"""

from __future__ import annotations

import re
from pathlib import Path

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
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
SIZE = r"([\d.]+)([KMGTP]?)i?B?"  # XLA's sizes: 95.73G, 1.00GiB, 512.00MiB, 100B
# A row of the memory-usage report: cumulative (share); size; offset; values; shapes.
_REPORT_ROW = re.compile(rf"^\s*{SIZE}\(\s*\d+%\);\s*{SIZE};\s*\d+;\s*(\d+);\s*(.*)$")


def size_bytes(number: str, unit: str) -> float:
    """("95.73", "G") -> bytes; XLA's K, M, G, T are powers of 1024."""
    return float(number) * _UNITS[unit]


def dump_options(directory: str | Path) -> dict:
    """Compiler options that dump the module's HLO text and buffer reports to `directory`."""
    return {"xla_dump_to": str(directory), "xla_dump_hlo_as_text": True}


def _dump_file(directory: str | Path, suffix: str) -> Path | None:
    found = sorted(Path(directory).glob(f"*{suffix}"), key=lambda p: p.stat().st_size)
    return found[-1] if found else None  # one module per compile; else the largest


def optimized_hlo(directory: str | Path) -> str | None:
    """The optimised (scheduled) HLO text of the module dumped in `directory`, if any."""
    path = _dump_file(directory, ".after_optimizations.txt")
    return None if path is None else path.read_text()


def largest_buffers(directory: str | Path, n: int = 5) -> list[dict] | None:
    """The `n` largest allocations of the dumped memory-usage report: {"bytes", "values",
    "shapes"} (the values sharing the allocation and their shapes); None without a report."""
    path = _dump_file(directory, ".after_optimizations-memory-usage-report.txt")
    if path is None:
        return None
    rows = []
    for line in path.read_text().splitlines():
        m = _REPORT_ROW.match(line)
        if m:
            rows.append({"bytes": size_bytes(m.group(3), m.group(4)), "values": int(m.group(5)),
                         "shapes": m.group(6).strip()})
    return sorted(rows, key=lambda r: -r["bytes"])[:n]


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
