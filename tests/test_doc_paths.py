"""Every repository path that the documentation names exists, so that a renamed or deleted file breaks CI rather
than the docs.

Scanned: README.md, CHANGELOG.md, docs/**/*.md, scripts/**/*.md, configs/**/*.yaml (whole files), and the
docstrings and comments of scripts/**/*.py, scripts/**/*.sh, tokenformer_vision/**/*.py and the top-level
modules. A path counts when it starts with one of the repository's top-level entries (``tokenformer_vision/``,
``configs/``, ``scripts/``, ``tests/``, ``docs/``, ``README.md``, ``CHANGELOG.md``, ``Makefile``,
``pyproject.toml``) at a word boundary, so URLs, absolute paths, ``runs/...`` outputs and paths inside other
folders (``.third_party/timm-X/tests/...``) are not taken for ours. ``{a,b}`` is expanded, ``*``/``**`` and
``<placeholder>`` must match at least one file, ``path::name`` also needs ``def name``/``class name`` in the file,
and relative Markdown links are resolved against the page's folder (their ``#anchor`` must be a heading there).
What a command writes (``--out PATH``, ``--plot PATH``, ``> PATH``) is not taken as a claim that the path exists.
Names of our modules and classes (``tokenformer_vision.x.Y``) in the README, docs/ and configs must import.
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_DIRS = ("tokenformer_vision", "configs", "scripts", "tests", "docs")
TOP_FILES = ("README.md", "CHANGELOG.md", "Makefile", "pyproject.toml")

_PART = r"(?:[\w.*-]|<[\w.-]+>|\{[\w.,*-]*\})"  # a path character, a <placeholder> or a {a,b} group
PATH_RE = re.compile(
    r"(?<![\w./<>{}-])"  # not inside a longer path, a URL or a word
    rf"((?:{'|'.join(TOP_DIRS)})/{_PART}*(?:/{_PART}+)*/?(?:::\w+)?"
    rf"|(?:{'|'.join(re.escape(f) for f in TOP_FILES)})(?![\w-]))"
)
LINK_RE = re.compile(r"\]\(([^()\s]+)\)")  # Markdown [text](target)
# what a command writes (``--out PATH``, ``--plot PATH``, ``> PATH``) is named, not claimed to exist
OUTPUT_RE = re.compile(r"(?:--[\w-]*(?:out|plot|json|save|dir)[\w-]*[ =]|>\s*)$")


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}.py`` → ``["a/b.py", "a/c.py"]`` (nested and repeated groups too)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for option in match.group(1).split(",")
            for p in expand_braces(path[:match.start()] + option + path[match.end():])]


def extract_paths(text: str) -> set[str]:
    """Repository paths named in ``text`` (relative to the repository root, braces expanded)."""
    found = set()
    for match in PATH_RE.finditer(text):
        if OUTPUT_RE.search(text[max(0, match.start() - 40):match.start()]):
            continue
        path = match.group(1).rstrip(".")  # a path at the end of a sentence
        found.update(expand_braces(path))
    return found


def extract_links(text: str, page: Path) -> set[str]:
    """Targets of relative Markdown links in ``text``, resolved against ``page``'s folder, anchors dropped."""
    found = set()
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor on the same page
        resolved = (page.parent / target.split("#", 1)[0]).resolve()
        try:
            found.add(resolved.relative_to(ROOT).as_posix() + ("/" if target.split("#")[0].endswith("/") else ""))
        except ValueError:
            found.add(str(resolved))  # outside the repository: reported as missing
    return found


def python_prose(source: str) -> str:
    """Docstrings (module, class, function) and comments of a Python file, one per line."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            parts.append(token.string)
    return "\n".join(parts)


def shell_prose(source: str) -> str:
    """Comments of a shell script (``#`` at the start of a line or after a blank)."""
    return "\n".join(m.group(1) for m in re.finditer(r"(?:^|\s)#(.*)$", source, re.MULTILINE))


def documents() -> dict[str, str]:
    """``{relative path: the text to scan}`` for every documentation source."""
    docs: dict[str, str] = {}
    files = [ROOT / f for f in ("README.md", "CHANGELOG.md")] + sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "scripts").rglob("*.md"))
    files += sorted((ROOT / "configs").rglob("*.yaml"))
    for path in files:
        if path.is_file():
            docs[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    for path in (sorted((ROOT / "scripts").rglob("*.py")) + sorted((ROOT / "tokenformer_vision").rglob("*.py"))
                 + sorted(ROOT.glob("*.py"))):
        docs[path.relative_to(ROOT).as_posix()] = python_prose(path.read_text(encoding="utf-8"))
    for path in sorted((ROOT / "scripts").rglob("*.sh")):
        docs[path.relative_to(ROOT).as_posix()] = shell_prose(path.read_text(encoding="utf-8"))
    return docs


def named_paths() -> dict[str, set[str]]:
    """``{path named: {documents naming it}}`` over every documentation source."""
    named: dict[str, set[str]] = {}
    for doc, text in documents().items():
        paths = extract_paths(text)
        if doc.endswith(".md"):
            paths |= extract_links(text, ROOT / doc)
        for path in paths:
            named.setdefault(path, set()).add(doc)
    return named


def exists(path: str) -> bool:
    """Whether a named path exists: globs and placeholders must match something; ``file::name`` needs the name."""
    path, _, member = path.partition("::")
    pattern = re.sub(r"<[^>]*>", "*", path)
    if "*" in pattern:
        return any(ROOT.glob(pattern.rstrip("/")))
    target = Path(pattern) if Path(pattern).is_absolute() else ROOT / pattern
    if not (target.is_dir() if path.endswith("/") else target.exists()):
        return False
    return not member or re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(member)}\b",
                                   target.read_text(encoding="utf-8"), re.MULTILINE) is not None


def test_every_named_path_exists():
    named = named_paths()
    missing = {path: sorted(docs) for path, docs in sorted(named.items()) if not exists(path)}
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(
        f"  {path}  (named in {', '.join(docs)})" for path, docs in missing.items())


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in heading.strip().lower()
                   if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = anchor = slug(m.group(1))
            n = 0
            while anchor in found:
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


def test_every_link_anchor_exists():
    """``[text](page.md#anchor)`` and ``[text](#anchor)`` in the README, the changelog and docs/ point at a heading."""
    broken = []
    for doc, text in documents().items():
        if not doc.endswith(".md"):
            continue
        for target in LINK_RE.findall(text):
            if "#" not in target or re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue
            page, anchor = target.split("#", 1)
            path = (ROOT / doc).parent / page if page else ROOT / doc
            if path.suffix == ".md" and path.is_file() and anchor not in anchors(path):
                broken.append(f"  {target}  (in {doc})")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert slug("4. Growth") == "4-growth"
    assert slug("The paper's ImageNet recipe") == "the-papers-imagenet-recipe"
    assert slug("Export: eager vs torch.compile vs ONNX Runtime") == "export-eager-vs-torchcompile-vs-onnx-runtime"
    assert slug("Detection: Faster R-CNN at 800×1333") == "detection-faster-r-cnn-at-8001333"


DOTTED_RE = re.compile(r"(?<![\w.])tokenformer_vision(?:\.[A-Za-z_]\w*)+")


def resolves(dotted: str) -> bool:
    """Whether ``tokenformer_vision.a.B`` names a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_named_module_and_class_exists():
    """``tokenformer_vision.x.Y`` in the README, docs/ and the configs (class paths) import. The changelog is left
    out: it names what was removed."""
    named: dict[str, set[str]] = {}
    for doc, text in documents().items():
        if doc.endswith((".md", ".yaml")) and doc != "CHANGELOG.md":
            for dotted in DOTTED_RE.findall(text):
                named.setdefault(dotted, set()).add(doc)
    assert len(named) >= 5, f"only {sorted(named)} found: is the extraction broken?"
    missing = {name: sorted(docs) for name, docs in sorted(named.items()) if not resolves(name)}
    assert not missing, "names in the docs that do not import:\n" + "\n".join(
        f"  {name}  (named in {', '.join(docs)})" for name, docs in missing.items())
    assert not resolves("tokenformer_vision.no_such_module") and not resolves("tokenformer_vision.NoSuchName")


def test_the_scan_finds_the_documentation():
    """Guards against an extractor that silently finds nothing (which would make the test above pass vacuously)."""
    named = named_paths()
    assert len(named) >= 60, f"only {len(named)} paths found: is the extraction broken?"
    for path in ("configs/demo/digits.yaml", "scripts/demo/demo.sh", "tests/reference.py", "docs/design.md"):
        assert path in named, f"{path} is named in the README but was not extracted"
    docs = documents()
    assert {"README.md", "CHANGELOG.md", "docs/design.md", "configs/demo/digits.yaml"} <= set(docs)
    assert any(d.startswith("scripts/") and d.endswith(".sh") for d in docs)
    assert any(d.startswith("tokenformer_vision/") for d in docs)


@pytest.mark.parametrize(("text", "expected"), [
    ("see `tokenformer_vision/kernel.py`.", {"tokenformer_vision/kernel.py"}),
    ("configs/imagenet/tokenformer_{tiny,small}.yaml, then", {"configs/imagenet/tokenformer_tiny.yaml",
                                                              "configs/imagenet/tokenformer_small.yaml"}),
    ("(tests/test_growth.py::test_x) and docs/", {"tests/test_growth.py::test_x", "docs/"}),
    ("https://github.com/o/r/blob/main/docs/x.md runs/digits/version_0/metrics.csv /data/imagenet/train", set()),
    ("PYTHONPATH=tests .third_party/timm-1.0.31/tests/test_models.py mytests/x.py", set()),
    ("edit README.md or pyproject.toml; not README.mdx", {"README.md", "pyproject.toml"}),
    ("scripts/<folder>/ and docs/benchmarks/*.json", {"scripts/<folder>/", "docs/benchmarks/*.json"}),
    ("python scripts/x.py --out docs/new.json --plot=docs/new.png > docs/log.txt", {"scripts/x.py"}),
])
def test_extract_paths(text, expected):
    assert extract_paths(text) == expected


def test_markdown_links_resolve_against_the_page():
    page = ROOT / "docs" / "cli.md"
    text = "[a](data.md#x) [b](../scripts/README.md) [c](https://example.org/docs/x.md) [d](#top)"
    assert extract_links(text, page) == {"docs/data.md", "scripts/README.md"}


def test_a_missing_path_is_reported():
    assert exists("docs/design.md") and exists("tokenformer_vision/") and exists("configs/*/digits.yaml")
    assert not exists("docs/no_such_page.md")
    assert not exists("tests/no_such_dir/")
    assert not exists("docs/benchmarks/*.no_such_suffix")
    assert exists("tests/test_doc_paths.py::test_a_missing_path_is_reported")
    assert not exists("tests/test_doc_paths.py::no_such_test")


def test_python_prose_is_docstrings_and_comments_only():
    source = '"""Module: docs/a.md."""\nX = "docs/code_string.md"  # comment: docs/b.md\n' \
             'def f():\n    """docs/c.md"""\n'
    assert extract_paths(python_prose(source)) == {"docs/a.md", "docs/b.md", "docs/c.md"}
