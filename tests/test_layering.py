"""DESIGN.md's layers, enforced on the source: imports point down, no cycles.

Every module under ``vlakit/`` is parsed with ``ast`` (nothing is imported), including
function-local imports. Layers, bottom to top::

    core                                   imports nothing of vlakit
    blocks: vision decoders heads interleave projectors actions pruners
                                           core and their own family only
    model (+ runner, batch, language, persistence)
                                           core and blocks
    distributed (FSDP2 helpers)            core, blocks, model
    convert                                core, blocks, model (not models)
    processors                             core and model
    bundle (the deployable policy)         core, blocks, model, processors
    models                                 everything above, convert, processors and
                                           bundle included (a family's loader can
                                           return its policy bundle)
    summary (parameter tables)             core
    viz (pictures of pruned patches)       core
    data (datasets, collate)               core, heads (the ActionHead protocol that
                                           check_model reads)
    recipe (training)                      core, blocks, model, processors, bundle,
                                           data, distributed
    serve (the policy server, executor)    core, blocks, model, processors, bundle
    cli (the vlakit command)               serve and what it may import
    vlakit (the package root)              anything; nothing imports it
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vlakit"

BLOCK_FAMILIES = (
    "vision",
    "decoders",
    "heads",
    "interleave",
    "projectors",
    "actions",
    "pruners",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The vlakit module an imported name lands in (a symbol resolves to its module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``(imported vlakit module, line)`` for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(_resolve(a.name), node.lineno) for a in node.names
                      if a.name.split(".")[0] == "vlakit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package holding this module
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "vlakit":
                continue
            for alias in node.names:  # `from vlakit import vision` imports a module
                full = f"{source}.{alias.name}"
                found.append((_resolve(full if full in MODULES else source), node.lineno))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return _SAME_LAYER_AS.get(parts[1], parts[1])


# modules that belong to another layer: the runner is the model's prediction plumbing
# (and its batch types, FiLM's language vectors, saving and loading a composition)
_SAME_LAYER_AS = {"runner": "model", "batch": "model", "language": "model",
                  "persistence": "model", "__main__": "cli"}

_BLOCKS = set(BLOCK_FAMILIES)
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    **{family: {"core", family} for family in BLOCK_FAMILIES},
    "model": {"core", "model"} | _BLOCKS,
    "convert": {"core", "model", "convert"} | _BLOCKS,
    "models": {"core", "model", "convert", "processors", "bundle", "models"} | _BLOCKS,
    "processors": {"core", "model", "processors"},
    "bundle": {"core", "model", "processors", "bundle"} | _BLOCKS,
    "summary": {"core", "summary"},  # parameter tables: a utility beside the core
    "viz": {"core", "viz"},  # pictures (matplotlib): a utility beside the core
    "data": {"core", "heads", "data"},  # datasets (pyarrow, PyAV); collates take a processor
    "distributed": {"core", "model", "distributed"} | _BLOCKS,  # FSDP2 / checkpointing
    # the training recipe: a model, data and a tokenizer in, a policy bundle out
    "recipe": {"core", "model", "processors", "bundle", "data", "distributed",
               "recipe"} | _BLOCKS,
    # serving a bundle (websockets, msgpack) and the command line on top of everything
    "serve": {"core", "model", "processors", "bundle", "serve"} | _BLOCKS,
    "cli": {"core", "model", "processors", "bundle", "data", "distributed", "recipe",
            "serve", "cli"} | _BLOCKS,
}


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if _layer(m) not in ALLOWED and _layer(m) != "root")
    assert not unknown, (
        f"modules outside DESIGN.md's layers: {unknown}; add their layer to ALLOWED in "
        f"tests/test_layering.py (and to DESIGN.md)"
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    layer = _layer(module)
    if layer not in ALLOWED:  # the root, or a module test_every_module_has_a_layer reports
        return
    bad = [
        f"{module} (line {line}) imports {target} (layer {_layer(target)!r}); layer "
        f"{layer!r} may import only {sorted(ALLOWED[layer])}"
        for target, line in _imports(module, MODULES[module])
        if _layer(target) not in ALLOWED[layer]
    ]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # a concrete path around the component, for the message
        members, start = set(component), min(component)
        path, seen = [start], {start}
        while True:
            nxt = min(w for w in graph[path[-1]] if w in members)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], int] = {}
    for module, path in MODULES.items():
        for target, line in _imports(module, path):
            if target in MODULES and target != module:
                graph[module].add(target)
                lines.setdefault((module, target), line)
    return graph, lines


def test_no_import_cycles():
    graph, lines = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(
        " -> ".join(
            f"{a} (line {lines[a, b]})" for a, b in zip(cycle, cycle[1:])
        ) + f" -> {cycle[-1]}"
        for cycle in cycles
    )


def test_nothing_imports_the_package_root():
    graph, lines = _graph()
    bad = [f"{m} (line {lines[m, 'vlakit']}) imports vlakit" for m in graph if "vlakit" in graph[m]]
    assert not bad, "the root package imports everything; import submodules instead:\n" + (
        "\n".join(bad)
    )


def test_the_checker_sees_violations(tmp_path):
    # The checker itself: function-local and relative imports are found, cycles are named.
    path = tmp_path / "fake.py"
    path.write_text(
        "import torch\n"
        "from .cache import KVCache\n"
        "def f():\n"
        "    from vlakit.model import VLA\n"
        "    import vlakit.convert.rename\n"
    )
    found = _imports("vlakit.decoders.fake", path)
    assert found == [
        ("vlakit.decoders.cache", 2), ("vlakit.model", 4), ("vlakit.convert.rename", 5)
    ]
    assert {_layer(t) for t, _ in found} - ALLOWED["decoders"] == {"model", "convert"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
