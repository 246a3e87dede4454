"""Package structure: no import cycle anywhere, and TokenFormerViT is timm's VisionTransformer."""

from __future__ import annotations

import ast
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from tokenformer_vision import TokenFormerViT

PACKAGE = Path(__file__).resolve().parents[1] / "tokenformer_vision"


def _imports() -> dict[str, set[str]]:
    """Module -> package modules it imports (read from the source, relative imports resolved)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).rstrip(".") \
                    if node.level else node.module or ""
                found |= {mod, *(f"{mod}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = {m for m in found if m in modules and m != name and m != PACKAGE.name}
    return edges


def test_no_import_cycle():
    edges = _imports()
    assert "tokenformer_vision.block" in edges["tokenformer_vision.model"]  # the walk sees relative imports
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def test_the_model_is_timms_vision_transformer():
    assert issubclass(TokenFormerViT, VisionTransformer)
