"""qlk's modules import each other without cycles (top-level and function-level imports alike),
so each module reads top-down and can be understood before the ones that use it.

The graph is built from the source with ``ast`` (nothing is imported). Known cycles are listed with
their reason; a new one fails the test.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "qlk"

KNOWN = {
    # QuantizedWeight.dequantize dispatches to the format modules, which build QuantizedWeights:
    # one package, one data type and its formats
    frozenset({"qlk.formats.quantized_weight", "qlk.formats.int_group", "qlk.formats.nf4"}),
    # qlk.io reads qlk.__version__ for its file metadata (late import)
    frozenset({"qlk", "qlk.io"}),
    # patch_model converts bitsandbytes layers and hands the model to qlk's Transformers quantizer,
    # whose loader patches, loads and dequantizes through qlk.patch / qlk.io: the patching and the
    # Transformers integration call each other (function-level imports only; nothing cycles at import)
    frozenset({"qlk", "qlk.integrations.bnb_models", "qlk.integrations.transformers", "qlk.io", "qlk.patch"}),
}


def module_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph = {}
    for name, (path, is_pkg) in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + (node.module.split(".") if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def cycles(graph) -> list[frozenset]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_new_import_cycles():
    found = cycles(module_graph())
    new = [sorted(c) for c in found if c not in KNOWN]
    assert not new, f"import cycles: {new}"


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    graph = module_graph()
    assert "qlk.train.command" in graph["qlk.train"] and "qlk.lm" in graph["qlk.evaluate"]
