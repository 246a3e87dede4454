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


# ------------------------------------------------------------------------- no private members of Lightning or timm
FOREIGN = ("lightning", "pytorch_lightning", "timm")
# underscore names that Lightning documents for subclasses to call (Callback.state_key's documented recipe)
DOCUMENTED = {"_generate_state_key"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _our_privates(trees: list[ast.AST]) -> set[str]:
    """Private names the package itself defines: its functions, classes, attributes and variables."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if _is_private(n)} | DOCUMENTED


def private_foreign_accesses(source: str, ours: set[str], foreign_classes: set[str] = frozenset()) -> list[str]:
    """``obj._name`` (or ``getattr(obj, "_name")``, or an import of a private name) where ``obj`` is a Lightning
    or timm object: a name imported from them, ``self`` in a class derived from one of their classes, or a
    parameter annotated with one of their types; ``_name`` not one the package defines itself."""
    tree, found = ast.parse(source), []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FOREIGN:
            if any(_is_private(p) for p in node.module.split(".")) or any(_is_private(a.name) for a in node.names):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
            imported |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FOREIGN:
                    if any(_is_private(p) for p in a.name.split(".")):
                        found.append(f"line {node.lineno}: import {a.name}")
                    imported.add(a.asname or a.name.split(".")[0])
    foreign = imported | set(foreign_classes)

    def is_foreign(expr: ast.AST | None) -> bool:
        root = _root(expr) if expr is not None else None
        return isinstance(root, ast.Name) and root.id in foreign

    def check(node: ast.AST, roots: set[str]) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and _is_private(sub.attr) and sub.attr not in ours:
                root = _root(sub.value)
                if isinstance(root, ast.Name) and (root.id in roots or root.id in imported):
                    found.append(f"line {sub.lineno}: {ast.unparse(sub)}")
            elif (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in ("getattr", "hasattr")
                  and len(sub.args) >= 2 and isinstance(name := sub.args[1], ast.Constant)
                  and isinstance(name.value, str) and _is_private(name.value) and name.value not in ours):
                root = _root(sub.args[0])
                if isinstance(root, ast.Name) and (root.id in roots or root.id in imported):
                    found.append(f"line {sub.lineno}: {ast.unparse(sub)}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            roots = {a.arg for a in args if is_foreign(a.annotation)}
            check(node, roots)
        elif isinstance(node, ast.ClassDef) and any(is_foreign(b) for b in node.bases):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    check(item, {"self", "cls"})
    check(ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))],
                     type_ignores=[]), set())
    return sorted(set(found))


def _foreign_subclasses(trees: list[ast.AST]) -> set[str]:
    """Names of the package's classes that derive, directly or through each other, from Lightning or timm."""
    bases: dict[str, set[str]] = {}
    foreign: set[str] = set()
    for tree in trees:
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        imported = {a.asname or a.name.split(".")[0] for n in imports for a in n.names
                    if ((n.module or "") if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] in FOREIGN}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = {r.id for b in node.bases if isinstance(r := _root(b), ast.Name)}
                bases[node.name] = names
                if names & imported:
                    foreign.add(node.name)
    while grown := {c for c, b in bases.items() if c not in foreign and b & foreign}:
        foreign |= grown
    return foreign


def test_no_private_member_of_lightning_or_timm_objects():
    paths = [*PACKAGE.rglob("*.py"), PACKAGE.parent / "tokenformer_vision_cli.py"]
    trees = [ast.parse(p.read_text()) for p in paths]
    ours, classes = _our_privates(trees), _foreign_subclasses(trees)
    problems = {str(p.relative_to(PACKAGE.parent)): found for p in paths
                if (found := private_foreign_accesses(p.read_text(), ours, classes))}
    assert not problems, f"private members of Lightning/timm objects: {problems}"


def test_the_private_member_scan_finds_what_it_must():
    source = '''
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.models import _registry
import timm

class Mine(ModelCheckpoint):
    def setup(self, trainer: Trainer, pl_module, stage):
        self._every_n_epochs          # theirs
        self._own = 1                 # ours
        self._own
        trainer.strategy._root_device  # theirs, through a chain
        getattr(trainer, "_ckpt_path")  # theirs, by name
        pl_module._something          # unannotated: not known to be theirs

def helper(model):
    return timm.models._builder, model._private
'''
    found = private_foreign_accesses(source, {"_own"})
    assert found == sorted(["line 4: from timm.models import _registry", "line 9: self._every_n_epochs",
                            "line 12: trainer.strategy._root_device", "line 13: getattr(trainer, '_ckpt_path')",
                            "line 17: timm.models._builder"]), found
