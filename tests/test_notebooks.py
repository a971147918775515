"""The Colab notebooks run top to bottom on forced CPU devices and are committed without outputs."""

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

# Per notebook: the line its last cell must print, and how many cells must show a figure.
EXPECT = {
    "01_quickstart.ipynb": {"summary": "quickstart done:", "figures": 2},
    "02_partition_planner.ipynb": {"summary": "planner done:", "figures": 2},
    "03_schedules.ipynb": {"summary": "schedules done:", "figures": 5},
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """name -> (executed notebook, its working dir); each notebook runs once per session."""
    cache = {}

    def run(name: str):
        if name not in cache:
            workdir = tmp_path_factory.mktemp(Path(name).stem)
            shutil.copy(ROOT / "colab" / name, workdir / name)
            nb = nbformat.read(workdir / name, as_version=4)
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
            client = NotebookClient(
                nb,
                timeout=CELL_TIMEOUT_S,
                kernel_name="python3",
                resources={"metadata": {"path": str(workdir)}},
            )
            t0 = time.perf_counter()
            client.execute(env=env)
            print(f"{name}: {time.perf_counter() - t0:.1f}s")
            cache[name] = (nb, workdir)
        return cache[name]

    return run


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _has_figure(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert _code(nb), f"{path.name} has no code cells"
    for cell in _code(nb):
        assert cell.outputs == [], f"{path.name}: strip outputs before committing"
        assert cell.execution_count is None, f"{path.name}: clear execution counts"


def test_every_notebook_is_checked():
    names = {p.name for p in NOTEBOOKS}
    assert names <= set(EXPECT), names - set(EXPECT)
    assert {"01_quickstart.ipynb", "03_schedules.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, executed):
    nb, _ = executed(path.name)
    expect = EXPECT[path.name]
    code = _code(nb)
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert sum(_has_figure(c) for c in code) >= expect["figures"]
    assert expect["summary"] in _text(code[-1])


def test_quickstart_trains_on_eight_cpu_devices(executed):
    """The install cell is skipped, 8 CPU devices are used, the loss falls, outputs are written."""
    nb, workdir = executed("01_quickstart.ipynb")
    out = "".join(_text(c) for c in _code(nb))
    assert "Successfully installed" not in out
    assert ": 8 x cpu (cpu)" in out
    assert (workdir / "runs/quickstart/summary.json").exists()
    assert (workdir / "schedule.png").stat().st_size > 1000
    line = next(l for l in out.splitlines() if l.startswith("quickstart done:"))
    first, final = map(float, re.search(r"loss (\S+) -> ([^,]+),", line).groups())
    assert final < first - 0.5, line


def test_schedules_bubbles_match_formula(executed):
    """The schedules notebook's table: every schedule's bubble equals (S-1)/(RM+S-1)."""
    nb, _ = executed("03_schedules.ipynb")
    out = "".join(_text(c) for c in _code(nb))
    rows = [
        l.split()
        for l in out.splitlines()
        if l.split()[:1]
        and l.split()[0] in ("gpipe", "circular", "1f1b", "interleaved_1f1b")
        and "[" in l
    ]
    assert [r[0] for r in rows] == ["gpipe", "circular", "1f1b", "interleaved_1f1b"]
    for r in rows:
        assert r[2] == r[3], r
