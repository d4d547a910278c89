"""The package's layers: no module imports from a layer above its own.

Every module under ``sslsky/`` is parsed with :mod:`ast` (imports at any depth: inside functions, ``if
TYPE_CHECKING`` blocks, ``try`` blocks) and each ``sslsky.*`` import is mapped to its layer, low to high:

    leaf -> data -> augment, models (one level) -> methods -> train -> eval -> cli

A module may import from its own layer or any layer below (augment and models share a level: today neither
imports the other). The check reads the tree as it is on disk, so a
module added under a known folder is covered without editing this file; a top-level module no layer names
is a failure of its own (say where it belongs).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sslsky"

#: Top-level modules of the leaf layer (``sslsky/<name>.py``; ``__init__`` is the package itself).
LEAF_MODULES = ("__init__", "errors", "outputs", "config", "vocabulary", "dist", "devices", "schedules", "surveys",
                "machine", "parallel", "progress", "locks", "losses")
#: Layer name -> rank; equal ranks may import each other.
RANKS = {"leaf": 0, "data": 1, "augment": 2, "models": 2, "methods": 3, "train": 4, "eval": 5, "cli": 6}
#: Sub-packages (``sslsky/<name>/``) and the top-level modules above the leaf layer.
PACKAGE_LAYERS = {"data": "data", "models": "models", "methods": "methods", "train": "train", "eval": "eval"}
MODULE_LAYERS = {"augment": "augment", "cli": "cli", "__main__": "cli", **dict.fromkeys(LEAF_MODULES, "leaf")}


def module_name(path: Path) -> str:
    """``sslsky/train/pretrain.py`` -> ``sslsky.train.pretrain``; ``sslsky/data/__init__.py`` -> ``sslsky.data``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``sslsky`` module name (None: a top-level module no layer names)."""
    parts = module.split(".")
    if parts == ["sslsky"]:
        return "leaf"
    head = parts[1]
    if head in PACKAGE_LAYERS and (PACKAGE / head).is_dir():
        return PACKAGE_LAYERS[head]
    return MODULE_LAYERS.get(head)


def imported_modules(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every ``sslsky`` import in the file, at any depth (relative ones resolved
    from ``here``, the file's dotted module name: by default where it lies).

    ``from sslsky import dist`` names the module ``sslsky.dist`` when ``sslsky/dist.py`` (or a folder) exists,
    else the package itself (a name defined in ``sslsky/__init__.py``).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sslsky"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "sslsky":
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                folder = PACKAGE.parent.joinpath(*candidate.split("."))
                is_module = folder.with_suffix(".py").is_file() or folder.is_dir()
                found.append((node.lineno, candidate if is_module else source))
    return found


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def import_edges() -> list[tuple[str, int, str, str, str]]:
    """``(file, line, importer layer, imported module, its layer)`` of every import inside the package."""
    edges = []
    for path in all_modules():
        own = layer_of(module_name(path))
        for line, target in dict.fromkeys(imported_modules(path)):  # one edge per module named on a line
            edges.append((str(path.relative_to(PACKAGE.parent)), line, own, target, layer_of(target)))
    return edges


def upward(edges: list[tuple[str, int, str, str, str]]) -> list[tuple[str, int, str, str, str]]:
    """The edges whose imported module lies in a higher layer than the importer."""
    return [e for e in edges if e[2] is not None and e[4] is not None and RANKS[e[4]] > RANKS[e[2]]]


def test_every_module_has_a_layer():
    unplaced = [str(p.relative_to(PACKAGE.parent)) for p in all_modules() if layer_of(module_name(p)) is None]
    assert not unplaced, (f"modules in no layer: {unplaced}; add each to LEAF_MODULES / MODULE_LAYERS / "
                          f"PACKAGE_LAYERS in {Path(__file__).name} (where it belongs)")


def test_no_import_goes_up_a_layer():
    edges = import_edges()
    assert len(edges) > 100, f"only {len(edges)} sslsky imports found: the parser misses imports"
    up = upward(edges)
    lines = "\n".join(f"  {file}:{line} ({own}) imports {target} ({theirs})" for file, line, own, target, theirs in up)
    assert not up, f"{len(up)} import(s) go up a layer (leaf < data < augment = models < methods < " \
                       f"train < eval < cli):\n{lines}"


def test_the_parser_sees_nested_relative_and_type_checking_imports(tmp_path):
    """The checker itself: an import inside a function, under TYPE_CHECKING and a relative one are all found."""
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from sslsky.train.pretrain import run_pretrain\n"
              "def f():\n    import sslsky.eval.encoders\n    from . import rundir\n    from ..models import vit\n")
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = [m for _, m in imported_modules(probe, here="sslsky.train.probe")]
    assert found == ["sslsky.train.pretrain", "sslsky.eval.encoders", "sslsky.train.rundir", "sslsky.models.vit"]
    assert [layer_of(m) for m in found] == ["train", "eval", "train", "models"]
    edges = [("probe.py", line, "train", m, layer_of(m)) for line, m in imported_modules(probe, "sslsky.train.probe")]
    assert [e[3] for e in upward(edges)] == ["sslsky.eval.encoders"]  # train -> eval goes up; the rest does not
