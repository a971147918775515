"""The Colab notebooks run top to bottom on forced CPU devices and are committed without outputs.

Each notebook runs once, in a temp copy of its folder, in a fresh kernel that imports this
checkout; one test per notebook checks everything about that run (so `pytest -n 2` does not
execute a notebook twice).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
SCHEDULES = ["gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"]


def _execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    shutil.copy(ROOT / "colab" / name, workdir / name)
    nb = nbformat.read(workdir / name, as_version=4)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": workdir}}
    )
    t0 = time.perf_counter()
    client.execute(env=env)
    print(f"{name}: {time.perf_counter() - t0:.1f}s")
    return nb


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cells) -> str:
    return "".join(
        o.get("text", "") for c in cells for o in c.get("outputs", []) if o.output_type == "stream"
    )


def _figures(nb) -> int:
    """Code cells that display at least one PNG."""
    return sum(any("image/png" in o.get("data", {}) for o in c.outputs) for c in _code(nb))


def _check_quickstart(nb, out: str, workdir: Path) -> None:
    """Install skipped, 8 CPU devices, loss falls, run directory and Gantt chart written."""
    assert _figures(nb) >= 2  # loss curve, Gantt chart
    assert "Successfully installed" not in out
    assert ": 8 x cpu (cpu)" in out
    assert (workdir / "runs/quickstart/summary.json").exists()
    assert (workdir / "schedule.png").stat().st_size > 1000
    line = next(l for l in out.splitlines() if l.startswith("quickstart done:"))
    first, final = map(float, re.search(r"loss (\S+) -> ([^,]+),", line).groups())
    assert final < first - 0.5, line


def _check_schedules(nb, out: str, workdir: Path) -> None:
    """Six Gantt charts and three plots; each schedule's table bubble equals its closed form
    (zbv has none: shown as a dash)."""
    assert _figures(nb) >= 5
    assert all((workdir / f"gantt_{name}.png").exists() for name in SCHEDULES)
    # The bubble table: name, R, bubble of the table, formula, [peak in flight per stage], ...
    rows = re.findall(r"^(\S+) +(\d+) +([\d.]+) +([\d.]+|—) +\[", out, re.MULTILINE)
    assert [r[0] for r in rows] == SCHEDULES
    for name, _, bubble, formula in rows:
        assert bubble == formula or (name == "zbv" and formula == "—"), (name, bubble, formula)
    assert (workdir / "interleaved_1f1b.trace.json").stat().st_size > 1000
    assert "schedules done:" in out


def _check_planner(nb, out: str, workdir: Path) -> None:
    """The CLI's JSON parsed, stage and sweep charts drawn, the saved plan covers every layer."""
    assert _figures(nb) >= 4  # GPT-3 stages, LLaMA schedules, devices, bottleneck sweep
    assert "layout E+t*" in out  # from the CLI's --json output
    plan = json.loads((workdir / "gpt3_175b_plan.json").read_text())
    assert plan["model"] == "gpt3-175b" and plan["num_stages"] == 8
    assert sum(st["num_layers"] for st in plan["stages"]) == 96
    assert all(st["memory_bytes"] < 95 * 2**30 for st in plan["stages"])
    line = next(l for l in out.splitlines() if l.startswith("planner done:"))
    fits = line.split("fits on")[1].split(" at 16 stages")[0]
    assert "h200" in fits and "tpu-v5e" not in fits, line  # 141 GB fits, 16 GiB cannot
    # The autotuner's two tables, each ending with the best configuration's command.
    assert out.count("best: ") == 2 and "autotune: gpt3-175b on 1024 x a100-80gb" in out
    assert "autotuned: llama-3-70b " in line, line


CHECKS = {
    "01_quickstart.ipynb": _check_quickstart,
    "02_partition_planner.ipynb": _check_planner,
    "03_schedules.ipynb": _check_schedules,
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert _code(nb), f"{path.name} has no code cells"
    for cell in _code(nb):
        assert cell.outputs == [], f"{path.name}: strip outputs before committing"
        assert cell.execution_count is None, f"{path.name}: clear execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_is_introduced(path):
    """A markdown cell says what each code cell shows; code cells stay short."""
    cells = nbformat.read(path, as_version=4).cells
    for i, cell in enumerate(cells):
        if cell.cell_type == "code":
            assert i > 0 and cells[i - 1].cell_type == "markdown", f"{path.name} cell {i}"
            assert len(cell.source.splitlines()) <= 40, f"{path.name} cell {i} is long"


def test_every_notebook_is_checked():
    assert {p.name for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = _execute(path.name, tmp_path)
    code = _code(nb)
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    errors = [f"{o.ename}: {o.evalue}" for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # The last cell prints the notebook's one-line summary.
    assert _text(code[-1:]).strip(), "the summary cell printed nothing"
    CHECKS[path.name](nb, _text(code), tmp_path)
