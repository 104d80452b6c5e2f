"""The import rules between layers (docs/architecture.md), read from the source with `ast`.

Layers, each importing only those below it (entrypoints: lcjax/train, serve, convert, scripts,
are unrestricted):
  techniques   lcjax.quant, lcjax.lora, lcjax.sparsity (model and below; `python -m lcjax.lora`
               is an entrypoint), lcjax.parallel (ops and below)
  model        lcjax.model: ops, base, pallas_kernels, and lcjax.parallel, whose ambient context
               lcjax/parallel/context.py documents; never lcjax.quant nor lcjax.serve
  ops          lcjax.ops: base and pallas_kernels
  kernels      pallas_kernels: nothing from lcjax
  base         lcjax.config (+ config_checks, config_run), lcjax.config_io, lcjax.data, lcjax.lazy,
               lcjax.run_checkpoint
No module imports another package's private (underscore) names, and the lm_head projection is
written once (lcjax/model/model.py `project_logits`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ("lcjax.config", "lcjax.config_checks", "lcjax.config_run", "lcjax.config_io", "lcjax.data",
        "lcjax.lazy", "lcjax.run_checkpoint")
OPS = BASE + ("lcjax.ops", "pallas_kernels")
# Package or module (dotted prefix) -> first-party prefixes it may import from.
ALLOWED = {
    "pallas_kernels": ("pallas_kernels",),
    **{base: BASE for base in BASE},
    "lcjax.ops": OPS,
    "lcjax.model": OPS + ("lcjax.model", "lcjax.parallel"),
    "lcjax.parallel": OPS + ("lcjax.parallel",),
    "lcjax.quant": OPS + ("lcjax.model", "lcjax.quant"),
    "lcjax.lora.__main__": None,  # an entrypoint: unrestricted
    "lcjax.lora": OPS + ("lcjax.model", "lcjax.lora"),
    "lcjax.sparsity": OPS + ("lcjax.model", "lcjax.sparsity"),
}
FIRST_PARTY = ("lcjax", "pallas_kernels")
SCANNED = ("lcjax", "pallas_kernels", "scripts")


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _sources() -> list[pathlib.Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py")
                  if not p.name.endswith("_test.py"))


def imports(path: pathlib.Path, root: pathlib.Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, absolute module, imported names) of every import statement in the file."""
    module = _module_name(path, root)
    package = _package(module, path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base, tuple(a.name for a in node.names)))
    return out


def _first_party(name: str) -> bool:
    return name.split(".")[0] in FIRST_PARTY


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str, root: pathlib.Path) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def layering_violations(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """What this file imports against the rules, one line each."""
    module = _module_name(path, root)
    package = _package(module, path)
    rules = next((allowed for prefix, allowed in ALLOWED.items() if _within(module, prefix)), None)
    found = []
    for line, target, names in imports(path, root):
        if not _first_party(target):
            continue
        where = f"{path.relative_to(root)}:{line}"
        if rules is not None and not any(_within(target, ok) for ok in rules):
            found.append(f"{where} imports {target} (allowed: {', '.join(rules)})")
        # `from pkg import mod` imports a module whose package is pkg; otherwise the names
        # belong to module `target`, whose package is its parent.
        for name in names:
            owner = target if _is_module(f"{target}.{name}", root) else target.rpartition(".")[0]
            if _private(name) and owner != package:
                found.append(f"{where} imports private {target}.{name} from package {owner}")
        private_parts = [p for p in target.split(".") if _private(p)]
        if private_parts and not _within(target, package):
            found.append(f"{where} imports private module {target}")
    return found


@pytest.mark.parametrize("top", SCANNED)
def test_imports_follow_the_layering(top):
    found = [v for p in _sources() if p.relative_to(ROOT).parts[0] == top
             for v in layering_violations(p)]
    assert not found, "\n".join(found)


def test_the_lm_head_projection_is_written_once():
    """Training, cached decode, serving and MTP drafts share model.project_logits."""
    sites = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "lcjax").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if "BSM,MV->BSV" in line]
    assert sites == ["lcjax/model/model.py:" + sites[0].rpartition(":")[2]], sites


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    """A fake tree with one violation of each rule (and legal neighbours) is judged correctly."""
    files = {
        "lcjax/__init__.py": "",
        "lcjax/config.py": "def _check(): pass\n",
        "lcjax/model/__init__.py": "",
        "lcjax/model/a.py": ("from lcjax.quant import observe\n"
                             "from lcjax.serve.kv_cache import PagedLayerCache\n"
                             "from lcjax.ops import observe\n"
                             "from lcjax.model.b import _helper\n"
                             "import jax\n"),
        "lcjax/model/b.py": "def _helper(): pass\n",
        "lcjax/ops/__init__.py": "",
        "lcjax/ops/o.py": "from lcjax.model.b import helper\nfrom pallas_kernels import k\n",
        "lcjax/data/__init__.py": "",
        "lcjax/data/spec.py": "from lcjax.config import _check\n",
        "lcjax/serve/__init__.py": "",
        "lcjax/serve/runner.py": ("from lcjax.model.b import _helper\n"
                                  "from ..model import b\n"),
        "lcjax/serve/x.py": "import lcjax.model._impl\n",
        "pallas_kernels/__init__.py": "",
        "pallas_kernels/k.py": ("from lcjax.config import ModelConfig\n"
                                "from pallas_kernels import _util\n"),
        "pallas_kernels/_util.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = {rel: layering_violations(tmp_path / rel, tmp_path) for rel in files}
    assert [v.split(" (allowed")[0] for v in got["lcjax/model/a.py"]] == [
        "lcjax/model/a.py:1 imports lcjax.quant",
        "lcjax/model/a.py:2 imports lcjax.serve.kv_cache",
    ]  # lcjax.ops, jax and a same-package private name (model.b._helper) are fine
    assert [v.split(" (allowed")[0] for v in got["lcjax/ops/o.py"]] == [
        "lcjax/ops/o.py:1 imports lcjax.model.b"]
    assert got["lcjax/data/spec.py"] == [
        "lcjax/data/spec.py:1 imports private lcjax.config._check from package lcjax"]
    assert got["lcjax/serve/runner.py"] == [
        "lcjax/serve/runner.py:1 imports private lcjax.model.b._helper from package "
        "lcjax.model"]  # the relative import resolves to lcjax.model.b: public
    assert got["lcjax/serve/x.py"] == [
        "lcjax/serve/x.py:1 imports private module lcjax.model._impl"]
    assert got["pallas_kernels/k.py"] == [
        "pallas_kernels/k.py:1 imports lcjax.config (allowed: pallas_kernels)"]
