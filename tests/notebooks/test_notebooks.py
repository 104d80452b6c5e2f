"""notebooks/: each jupytext percent `.py` (the source of truth) matches its committed `.ipynb`,
and each notebook runs end to end on CPU.

The pairing check parses the percent format here (cells start at `# %%` lines; markdown cells are
`# %% [markdown]` with `# `-prefixed lines), so the fast test needs no jupytext; where jupytext
is installed a second test holds this parser to jupytext's own conversion both ways. Notebooks
run as plain `python NAME.py` in a subprocess (the install cell is plain Python, skipped when
lcjax is importable), so no Jupyter kernel is needed; LCJAX_NOTEBOOK_SMOKE=1 shortens training.
"""

import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
BADGE = "https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/{}.ipynb"


def percent_cells(text: str) -> list[tuple[str, str]]:
    """(cell_type, source) of each cell of a jupytext percent-format script."""
    lines = text.splitlines()
    if lines and lines[0] == "# ---":  # the YAML header (jupytext and kernel metadata)
        lines = lines[lines.index("# ---", 1) + 1:]
    cells: list[tuple[str, list[str]]] = []
    for line in lines:
        marker = re.fullmatch(r"# %%( \[markdown\])?", line)
        if marker:
            cells.append(("markdown" if marker.group(1) else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' line: {line!r}")
    out = []
    for kind, body in cells:
        if kind == "markdown":
            bad = [b for b in body if b.strip() and not (b == "#" or b.startswith("# "))]
            if bad:
                raise ValueError(f"markdown line without a '# ' prefix: {bad[0]!r}")
            body = [b[2:] if b.startswith("# ") else "" if b == "#" else b for b in body]
        out.append((kind, "\n".join(body).strip("\n")))
    return out


def ipynb_cells(path: pathlib.Path) -> list[tuple[str, str]]:
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def test_parser_splits_cells_and_strips_markdown_prefixes():
    text = "# ---\n# jupyter: {}\n# ---\n\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\ny = 2\n"
    assert percent_cells(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "y = 2")]
    with pytest.raises(ValueError, match="without a '# ' prefix"):
        percent_cells("# %% [markdown]\nnot a comment\n")


def test_every_notebook_has_a_pair():
    assert NAMES, "no notebooks found"
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert ipynbs == NAMES, f"unpaired: .py {NAMES} vs .ipynb {ipynbs}"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_py(name):
    py = percent_cells((NOTEBOOKS / f"{name}.py").read_text())
    nb = ipynb_cells(NOTEBOOKS / f"{name}.ipynb")
    assert py == nb, (f"notebooks/{name}.ipynb is out of date with {name}.py: run "
                      f"`jupytext --to ipynb notebooks/{name}.py`")
    title = py[0][1]
    assert py[0][0] == "markdown" and title.startswith("# ") and BADGE.format(name) in title, title
    assert 'find_spec("lcjax") is None' in py[1][1], "the second cell installs lcjax when missing"


@pytest.mark.parametrize("name", NAMES)
def test_py_is_what_jupytext_writes(name):
    """Our parser agrees with jupytext, and the .py is in jupytext's canonical form."""
    jupytext = pytest.importorskip("jupytext")
    text = (NOTEBOOKS / f"{name}.py").read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    assert [(c.cell_type, c.source) for c in nb.cells] == percent_cells(text)
    def unversioned(s: str) -> str:  # the header names the jupytext release that wrote it
        return re.sub(r"(?m)^#\s+jupytext_version: .*\n", "", s)

    assert unversioned(jupytext.writes(nb, fmt="py:percent")) == unversioned(text)


# name -> (a line the notebook prints on success, whether it is slow on 2 CPU cores)
EXPECT = {
    "01_tour": (r"zero share per layer: \[", True),
    "02_train_tiny": (r"held-out loss \d+\.\d+ -> \d+\.\d+", True),
    "03_convert_hf": (r"max \|lcjax - transformers\| = \d\.\d+e-\d\d|has no LongcatFlash", True),
    "04_quantize_and_serve": (r"fptq_w4a8:group_size=8 +held-out perplexity", True),
    "05_sharding_plan": (r"\| ep_fsdp_tp +\| fsdp=4 x expert=32 x tensor=2 +\| +\d+\.\d \| +\d+\.\d \|", False),
}


def _params() -> list:
    return [pytest.param(name, marks=[pytest.mark.slow] if EXPECT.get(name, ("", True))[1] else [])
            for name in NAMES]


def test_every_notebook_has_an_execution_expectation():
    assert sorted(EXPECT) == NAMES


@pytest.mark.parametrize("name", _params())
def test_notebook_runs_on_cpu(name, tmp_path):
    pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib")
    env = {**os.environ, "LCJAX_NOTEBOOK_SMOKE": "1", "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    elapsed, cpu = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    assert proc.returncode == 0, f"{name} failed after {elapsed:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(EXPECT[name][0], proc.stdout), proc.stdout[-3000:]
    print(f"{name}: {elapsed:.1f} s wall, {cpu_s:.1f} s CPU")
