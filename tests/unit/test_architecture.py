"""The shape of the code base: small files, no import cycles, dependencies pointing down,
and models that say truthfully how a pipeline can cut them."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

from distml.config import MODELS, ClickSpec, CNNSpec, MLPSpec, TransformerSpec
from distml.models import build_model

PACKAGE = Path(__file__).parents[2] / "src" / "distml"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (type hints: never executed)."""
    hints: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hints |= {id(n) for child in node.body for n in ast.walk(child)}
    return hints


def _imports(path: Path, modules: set[str]) -> set[str]:
    """distml modules imported anywhere in a module, inside functions too (a lazy import
    runs as surely as one at the top; only imports under ``if TYPE_CHECKING:`` do not
    count). ``from pkg import name`` counts as importing pkg.name when that is a module."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    hints = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle, importer first; None if there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1][::-1]  # graphlib lists it imported-first
    return None


def test_no_import_cycle_among_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    cycle = _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_base_modules_import_none_of_their_kinds():
    graph = _graph()
    assert not {m for m in graph["distml.distributed.strategy"]
                if m.startswith("distml.distributed.") and m != "distml.distributed.runtime"}
    assert not {m for m in graph["distml.execution.base"] if m.startswith("distml.execution.")}


# The layers, bottom up: a module may import its own layer and those below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "imports", "fsutil", "storage", "device", "processes"),
    ("config",),
    ("tasks", "selection", "rundir"),
    ("execution",),
    ("data",),
    ("models",),
    ("trust", "artifact", "registry"),
    ("distributed",),
    ("training",),
    ("plan",),
    ("search",),
    ("drift",),
    ("serving",),
    ("export",),
    ("workflow",),
    ("cli", "ui", "train", "verify", "__main__"),
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return -1 if module == "distml" else len(LAYERS)  # the package itself: its version only


def test_every_module_has_a_layer():
    assert not [m for m in _graph() if _layer(m) == len(LAYERS)]


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                    if _layer(d) > _layer(m))
    assert not upward, "imports of an upper layer:\n" + "\n".join(upward)


def test_function_level_imports_and_type_hints_are_told_apart(tmp_path):
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
            "def f():\n    import b\n")
    (tmp_path / "m.py").write_text(code)
    assert _imports(tmp_path / "m.py", {"a", "b"}) == {"b"}


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"


def test_no_function_is_over_60_lines():
    # Counted from the first line of the body: a CLI command's options are its signature.
    long = {f"{p.relative_to(PACKAGE)}:{n.name}": n.end_lineno - n.body[0].lineno + 1
            for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.body[0].lineno + 1 > 60}
    assert not long, f"functions over 60 lines: {long}"


def test_the_config_loads_without_torch():
    code = "import sys, distml.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("spec", "task", "features"), [
    (MLPSpec(type="mlp", hidden_sizes=[8, 8, 8]), "classification", 16),
    (CNNSpec(type="cnn", channels=[4]), "classification", 16),
    (TransformerSpec(type="transformer", num_layers=3, num_heads=2, dim=16),
     "language_modeling", 16),
    (ClickSpec(type="click", cardinalities=[50, 7], dim=4), "classification", 5),
], ids=lambda v: getattr(v, "type", None))
def test_declared_pipeline_layers_match_the_built_model(spec, task, features):
    # Every zoo model is listed here; the config refuses pipeline splits by the declared
    # count before any process starts, so it must be the built model's.
    assert {type(spec)} <= set(MODELS.members)
    model = build_model(spec.resolve(task=task, num_features=features, num_outputs=4,
                                     where="model"))
    declared = spec.pipeline_layer_count()
    if declared == 0:  # cannot be cut into stages
        assert not hasattr(model, "pipeline_layers")
    else:
        assert declared == len(model.pipeline_layers())


def test_the_zoo_is_covered_by_the_layer_count_test():
    assert {m.__name__ for m in MODELS.members} == {"MLPSpec", "CNNSpec", "TransformerSpec",
                                                      "ClickSpec"}
