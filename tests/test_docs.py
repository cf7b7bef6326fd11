"""The documentation cannot rot: its code runs and its API reference is whole.

Code blocks. Every ```` ```python ```` block of README.md and docs/**/*.md is a test, with
an id naming the file and the line of its opening fence (``README.md:42``). The blocks of
one file share one namespace and run in the order they appear, so a block may use what an
earlier block of the same file defined (a model, a tokenizer), as a reader working through
the page would. Blocks of different files never share anything. Under pytest-xdist the
blocks of a file may land on different workers, so a block's test first replays the
earlier blocks of its file if this process has not run them yet.

A block whose first line is a comment containing the word ``outline`` needs something a
user has and the tests cannot make (a real checkpoint, the network); it is only compiled.
Everything else must run at tiny sizes, nothing downloaded, full-size models only on the
``meta`` device.

The reference. ``mkdocs build --strict`` is run once into a temporary folder and the result
is checked for: a literal Sphinx role (``:class:`...``` etc.) on any page; a name from some
package's ``__all__`` (read at test time, so new names are covered) that the reference
does not document (mkdocstrings' inventory, ``objects.inv``); an unresolved
cross-reference (which ``--strict`` turns into a failed build, and which would otherwise
appear as ``[text][identifier]`` in the page).
"""

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, source) of every ```python block of a Markdown file."""
    blocks, current, start, indent = [], None, 0, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None:
            if match and match["lang"]:
                current, start, indent = [], number, match["indent"]
                if match["lang"] not in ("python", "py"):
                    current = False  # a non-Python fence: skip to its end
        elif match and not match["lang"]:
            if current is not False:
                blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not False:
            current.append(line[len(indent):] if line.startswith(indent) else line)
    return blocks


def _is_outline(source: str) -> bool:
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    return first.startswith("#") and "outline" in first.lower()


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = {path: _python_blocks(path) for path in DOC_FILES}
CASES = [
    pytest.param(path, index, id=f"{path.relative_to(ROOT)}:{line}")
    for path, blocks in BLOCKS.items()
    for index, (line, _) in enumerate(blocks)
]

_namespaces: dict[Path, tuple[dict, int]] = {}  # file -> (namespace, blocks run so far)


def _run_block(path: Path, index: int, namespace: dict) -> None:
    line, source = BLOCKS[path][index]
    code = compile(source, f"{path.relative_to(ROOT)}:{line}", "exec")
    if not _is_outline(source):
        exec(code, namespace)


@pytest.mark.parametrize("path, index", CASES)
def test_doc_block_runs(path, index, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace, done = _namespaces.get(path, (None, 0))
    if namespace is None or done != index:
        namespace, done = {"__name__": f"docs_{path.stem}"}, 0
        for earlier in range(index):  # what a reader ran before reaching this block
            try:
                _run_block(path, earlier, namespace)
            except Exception as error:
                line = BLOCKS[path][earlier][0]
                pytest.fail(f"an earlier block of {path.name} (line {line}) fails: {error!r}")
    _namespaces[path] = (namespace, index)  # a failing block is not counted as run
    _run_block(path, index, namespace)
    _namespaces[path] = (namespace, index + 1)


def test_every_python_block_is_found():
    """The fence parser sees the blocks it should (a guard against testing nothing)."""
    total = sum(len(b) for b in BLOCKS.values())
    fences = sum(p.read_text().count("```python") for p in DOC_FILES)
    assert total == fences > 0


# -- the API reference -------------------------------------------------------------------

SPHINX_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const):(?:`|<code>)"
)
UNRESOLVED = re.compile(r"\[[^\]\n]*\]\[vlakit\.[\w.]*\]|<autoref\b")


def _packages() -> list[types.ModuleType]:
    """vlakit, its public top-level modules and every public subpackage, with ``__all__``.

    (Modules inside a subpackage, such as ``vlakit.core.masks``, are implementation files;
    their package re-exports what is public.)"""
    import vlakit

    found = [vlakit]
    for info in pkgutil.walk_packages(vlakit.__path__, "vlakit."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts):
            continue
        if info.ispkg or len(parts) == 2:
            found.append(importlib.import_module(info.name))
    return [m for m in found if hasattr(m, "__all__")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + result.stderr[-4000:]
    return out


def _inventory(site: Path) -> set[str]:
    from mkdocstrings import Inventory

    with open(site / "objects.inv", "rb") as handle:
        return set(Inventory.parse_sphinx(handle))


def test_reference_pages_have_no_literal_sphinx_roles(site):
    bad = []
    for page in sorted(site.rglob("*.html")):
        for number, line in enumerate(page.read_text(errors="replace").splitlines(), 1):
            if SPHINX_ROLE.search(line) or UNRESOLVED.search(line):
                bad.append(f"{page.relative_to(site)}:{number}: {line.strip()[:160]}")
    assert not bad, "literal roles or unresolved cross-references:\n" + "\n".join(bad[:40])


def _resolve(identifier: str):
    """The Python object an inventory identifier names (None if it names none)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return None
            obj = getattr(obj, part)
        return obj
    return None


def test_every_exported_name_is_in_the_reference(site):
    """Each name of each package's ``__all__`` is documented, under its own path or under
    another path to the same object (e.g. ``vlakit.VLA`` documented as ``vlakit.VLA``, or a
    builder shadowed by its module documented as ``vlakit.models.openvla.openvla``)."""
    inventory = _inventory(site)
    documented = {}
    for identifier in inventory:
        obj = _resolve(identifier)
        if obj is not None and not isinstance(obj, (int, float, str, bool)):
            documented.setdefault(id(obj), identifier)
    missing = []
    for package in _packages():
        for name in package.__all__:
            path = f"{package.__name__}.{name}"
            obj = getattr(package, name, None)
            if path in inventory or (obj is not None and id(obj) in documented):
                continue
            missing.append(path)
    assert not missing, (
        "exported but not in the API reference (add it to a docs/api page, or check that "
        "a module of the same name does not shadow it): " + ", ".join(sorted(missing))
    )
