"""The package's layering, read from its source with ``ast`` (no import is executed).

Layers, bottom to top (a module may import modules of its own layer or below, never above):

0. ground: parameters and model facts, the eager reference, the torch backend, the Triton
   kernels and their backend, sink selection, tasks, profiles, the model loader;
1. the op (``act_kernels.op``: validate + dispatch);
2. the Transformers integration (``act_kernels.hf``);
3. scoring (``act_kernels.scoring``: samples, results, the plain scorer of both protocols) and
   the runtime of long runs (``act_kernels.runtime``), which search and evaluation stand on;
4. the pipeline: search, evaluation, inspection, their command-line pieces, the lm-eval adapter;
5. the command line (``cli``, ``demo``) and the package's public face (``act_kernels``).

Evaluation stands on scoring, not on the search: ``act_kernels.evaluate`` (what ``act eval``
and the demo's evaluation run), scoring and inspection reach no ``act_kernels.search`` module,
directly or through another module.

Every module (function-level imports included) is checked; a new module must be placed in a
layer here, so that its place is a decision and not an accident.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "act_kernels"
PACKAGE = "act_kernels"

LAYERS = [
    ("ground", ["params", "modelinfo", "sinks", "tensor_cache", "reference", "torch_backend",
                "triton_backend", "kernels", "tasks", "profiles", "model_loader", "calibration"]),
    ("op", ["op", "segments", "gradients"]),
    ("hf", ["hf"]),
    ("scoring", ["scoring", "runtime"]),
    ("pipeline", ["search", "evaluate", "inspection", "lmeval", "cli_args"]),
    ("cli", ["cli", "demo", ""]),
]
OP_LAYER = {"op", "segments", "gradients", "params", "torch_backend", "triton_backend", "reference",
            "sinks", "kernels",
            "tensor_cache", "calibration"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE] + parts)] = path
    return out


MODULES = _modules()


def _resolve(current: str, is_package: bool, node) -> list[str]:
    """The package modules an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = current.split(".") if is_package else current.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix
                 for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:       # "act_kernels.hf.api.x" -> its module
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE):
            found.append(name)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_resolve(name, is_package, node))
        edges.discard(name)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _layer(module: str) -> int:
    if module.endswith(".__main__"):          # ``python -m`` entry points are command lines
        return len(LAYERS) - 1
    top = module.split(".")[1] if "." in module else ""
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def test_the_graph_is_read():
    # the walk finds the imports it should (a broken resolver would make the tests below vacuous)
    assert "act_kernels.op" in GRAPH["act_kernels.hf.attention"]
    assert "act_kernels.profiles" in GRAPH["act_kernels.hf.state"]
    assert "act_kernels.params" in GRAPH["act_kernels.op"]
    assert len(MODULES) > 30


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = _layer(module)
    for target in GRAPH[module]:
        assert _layer(target) <= mine, (
            f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[_layer(target)][0]})")


def _reach(module: str) -> set[str]:
    """Every package module ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# Modules that must not stand on the search: evaluation (``act eval`` and the demo's evaluation
# call ``act_kernels.evaluate``), the scoring both stand on, inspection, the lm-eval adapter.
NOT_ON_SEARCH = ["act_kernels.evaluate", "act_kernels.lmeval", "act_kernels.cli_args"] + sorted(
    m for m in MODULES if m.split(".")[1:2] in (["scoring"], ["inspection"]))


@pytest.mark.parametrize("module", NOT_ON_SEARCH)
def test_evaluation_does_not_stand_on_the_search(module):
    search = sorted(m for m in _reach(module) if m.split(".")[1:2] == ["search"])
    assert not search, f"{module} imports search modules {search}"


def test_the_search_rule_can_fail():
    # the rule above is not vacuous: the demo runs the search (and so reaches it), and the
    # evaluation reaches the scoring package it stands on
    assert "act_kernels.search" in _reach("act_kernels.demo")
    assert "act_kernels.scoring.plain" in _reach("act_kernels.evaluate")
    assert len(NOT_ON_SEARCH) > 6


def test_op_layer_imports_nothing_above_it():
    for module, targets in GRAPH.items():
        if module.split(".")[1:2] and module.split(".")[1] in OP_LAYER:
            above = [t for t in targets if t.split(".")[1] not in OP_LAYER]
            assert not above, f"{module} (op layer) imports {above}"


def test_reference_imports_nothing_of_the_package():
    assert GRAPH["act_kernels.reference"] == set()


def test_no_module_shadows_the_standard_library():
    import sys

    shadows = [m for m in MODULES if m.rpartition(".")[2] in sys.stdlib_module_names]
    assert not shadows, f"modules named like standard-library modules: {shadows}"


def test_the_calibration_rule_has_one_home():
    """The thresholds of the calibration rule live in ``act_kernels/calibration.py`` alone: no
    other module of the package defines a ``STABLE_REST*`` or ``*TINY_REST`` name, and no backend
    module compares with, defaults to or passes one of the table's values as a literal (it asks
    ``calibration.stable_rest``)."""
    import re

    home = "act_kernels.calibration"
    table = next(node.value for node in ast.walk(ast.parse(MODULES[home].read_text()))
                 if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "STABLE_REST" for t in node.targets))
    values = {c.value for c in ast.walk(table) if isinstance(c, ast.Constant)
              and isinstance(c.value, float)}
    assert {0.2, 0.5, 1e-20} <= values, values          # the walk reads the table it should
    named = re.compile(r"STABLE_REST|TINY_REST")

    def literal(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in values and not isinstance(
            node.value, bool)

    found = []
    for module, path in MODULES.items():
        if module == home:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            targets += [e for t in targets if isinstance(t, ast.Tuple) for e in t.elts]
            found += [f"{module}: defines {t.id}" for t in targets
                      if isinstance(t, ast.Name) and named.search(t.id)]
            if module.split(".")[1:2] not in [[top] for top in OP_LAYER] or "reference" in module:
                continue          # only the backends apply the rule (0.5 is common elsewhere)
            if isinstance(node, ast.Compare) and any(map(literal, [node.left] + node.comparators)):
                found.append(f"{module}:{node.lineno}: compares with a threshold literal")
            if isinstance(node, ast.keyword) and "rest" in (node.arg or "") and literal(node.value):
                found.append(f"{module}:{node.value.lineno}: passes {node.arg}= as a literal")
            if isinstance(node, ast.arguments):
                params = node.posonlyargs + node.args + node.kwonlyargs
                defaults = ([None] * (len(node.posonlyargs + node.args) - len(node.defaults))
                            + list(node.defaults) + list(node.kw_defaults))
                found += [f"{module}:{p.lineno}: {p.arg} defaults to a literal"
                          for p, d in zip(params, defaults)
                          if d is not None and "rest" in p.arg and literal(d)]
    assert not found, "the calibration thresholds have a second home:\n" + "\n".join(found)


# Names used by more than one module above the op layer, each for the same role in its own
# package: a package's command line (``cli``) and its written outputs (``report``). Any other
# repeated name (two ``scoring``, two ``common``) is a name that says too little. (The backends
# below the op may mirror each other's module names by pass, as ``kernels/`` does.)
SHARED_NAMES = {"__init__", "__main__", "cli", "report"}


def test_module_names_say_what_they_hold():
    by_name: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if module.split(".")[1:2] and module.split(".")[1] not in OP_LAYER:
            by_name.setdefault(path.stem, []).append(module)
    repeated = {n: sorted(m) for n, m in by_name.items() if len(m) > 1 and n not in SHARED_NAMES}
    assert not repeated, f"modules sharing a name: {repeated}"
    packages = {m.split(".")[1] for m in MODULES if m.count(".") >= 2}
    clash = sorted(packages & set(by_name))      # e.g. tasks/scoring.py beside scoring/
    assert not clash, f"modules named like a package of the project: {clash}"
