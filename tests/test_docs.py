"""The README and docs/ point at things that exist: relative links and module paths.

Links: every relative Markdown link (inline `[text](target)` or a reference definition
`[name]: target`) outside code resolves to a file or folder, relative to the Markdown file;
anchors (`#...`) are stripped, http(s) and mailto links are not checked.

Module paths: every path under adapt_deploy/, bench/, tests/, integrations/, examples/,
cuda_kernels/, configs/ or docs/ named anywhere in the text (code included) exists, relative to
the repository root; and every dotted name `adapt_deploy.x.y` or `bench.x` is a module or package,
or a name its parent module defines (`def`, `class`, an assignment or an import; found by reading
the file, nothing is imported). bench/.work/ (scratch) is not checked; a file under bench/results/
must exist or be named by a script in bench/ (a result that script writes, e.g. on a GPU).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PATH_ROOTS = (
    "adapt_deploy",
    "bench",
    "tests",
    "integrations",
    "examples",
    "cuda_kernels",
    "configs",
    "docs",
)
DOTTED_ROOTS = ("adapt_deploy", "bench")

_FENCE = re.compile(r"^ *(```|~~~).*?^ *\1 *$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_PATH = re.compile(r"(?<![\w./~$-])(?:" + "|".join(PATH_ROOTS) + r")/[\w./-]*")
_DOTTED = re.compile(r"(?<![\w./-])(?:" + "|".join(DOTTED_ROOTS) + r")(?:\.[A-Za-z_]\w*)+")
_SKIP_SCHEMES = ("http://", "https://", "mailto:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/*.md and the READMEs under integrations/."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    files += sorted((root / "integrations").glob("**/README.md"))
    return [f for f in files if f.is_file()]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links are not code)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Relative link targets of Markdown text, without anchors; external links left out."""
    prose = strip_code(text)
    targets = _INLINE_LINK.findall(prose) + _REFERENCE_DEF.findall(prose)
    out = []
    for target in targets:
        if target.startswith(_SKIP_SCHEMES) or target.startswith("#"):
            continue
        target = target.split("#", 1)[0].split("?", 1)[0]
        if target:
            out.append(target)
    return out


def broken_links(text: str, base: Path) -> list[str]:
    """The relative links of `text` (a Markdown file in folder `base`) that resolve to nothing."""
    return [t for t in link_targets(text) if not (base / t).exists()]


def module_paths(text: str) -> list[str]:
    """Repository paths named in `text` (prose and code), trailing punctuation removed."""
    paths = []
    for match in _PATH.findall(text):
        path = match.rstrip(".")
        if path.startswith("bench/.work"):
            continue
        paths.append(path)
    return paths


def dotted_names(text: str) -> list[str]:
    return _DOTTED.findall(text)


def _module_file(root: Path, parts: list[str]) -> Path | None:
    """The source file of module `parts` (a .py file or a package's __init__.py), if any."""
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _defines(source: str, name: str) -> bool:
    """Whether module text `source` defines or imports `name` at any level."""
    n = re.escape(name)
    if re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{n}\b", source, re.MULTILINE):
        return True
    if re.search(rf"^\s*{n}\s*(?::[^=\n]*)?=(?!=)", source, re.MULTILINE):
        return True
    for imported in re.findall(
        r"^\s*from\s+\S+\s+import\s+(\([^)]*\)|[^\n]*)", source, re.MULTILINE
    ) + re.findall(r"^\s*import\s+([^\n]*)", source, re.MULTILINE):
        for item in imported.strip("()").replace("\n", " ").split(","):
            words = item.split("#", 1)[0].split()
            if words and words[-1] == name:  # `name` or `x as name`
                return True
    return False


def dotted_exists(dotted: str, root: Path = ROOT) -> bool:
    """A module or package under `root`, or a name its parent module file defines."""
    parts = dotted.split(".")
    if _module_file(root, parts) is not None or root.joinpath(*parts).is_dir():
        return True
    parent = _module_file(root, parts[:-1])
    return parent is not None and _defines(parent.read_text(encoding="utf-8"), parts[-1])


def result_declared(path: str, root: Path = ROOT) -> bool:
    """A bench/results file that some script in bench/ names (it writes it when run)."""
    name = Path(path).name
    scripts = [*(root / "bench").rglob("*.py"), *(root / "bench").rglob("*.sh")]
    return any(
        name in script.read_text(encoding="utf-8")
        for script in scripts
        if ".work" not in script.relative_to(root).parts
    )


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    """Module paths and dotted names of `text` that do not exist under `root`."""
    missing = []
    for path in module_paths(text):
        if (root / path).exists():
            continue
        if path.startswith("bench/results/") and result_declared(path, root):
            continue
        missing.append(path)
    missing += [d for d in dotted_names(text) if not dotted_exists(d, root)]
    return sorted(set(missing))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "docs" / "README.md").is_file()
    assert len(doc_files()) > 2


def test_relative_links_resolve():
    broken = [
        f"{_rel(f)}: {target}"
        for f in doc_files()
        for target in broken_links(f.read_text(encoding="utf-8"), f.parent)
    ]
    assert not broken, "links to nothing:\n  " + "\n  ".join(broken)


def test_module_paths_exist():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [
        f"{_rel(f)}: {name}" for f in files for name in missing_paths(f.read_text(encoding="utf-8"))
    ]
    assert not missing, "named in the docs but not in the repository:\n  " + "\n  ".join(missing)


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = set(link_targets(index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, f"docs pages missing from docs/README.md: {sorted(pages - linked)}"


# The checkers themselves, on text in memory: each must be able to fail.


def test_broken_link_is_reported(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("x")
    text = (
        "See [real](real.md#section), [gone](gone.md), [web](https://example.com/x.md),\n"
        "[mail](mailto:a@b.c), [here](#top) and ![img](pic.png).\n"
        "`[code](not-a-link.md)`\n"
        "```\n[fenced](also-not.md)\n```\n"
        "[ref]: ../missing/file.md\n"
    )
    assert broken_links(text, tmp_path / "docs") == ["gone.md", "pic.png", "../missing/file.md"]


def test_missing_module_paths_are_reported(tmp_path: Path):
    pkg = tmp_path / "adapt_deploy" / "runtime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from adapt_deploy.runtime.colors import (\n    colorize,\n    overlay as overlay,\n)\n"
    )
    (pkg / "colors.py").write_text("def colorize(x):\n    pass\n\nPALETTE: list = []\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "kernels.py").write_text('PATH = "results/kernel_choice.json"\n')
    text = (
        "`adapt_deploy/runtime/colors.py`, adapt_deploy/runtime/, adapt_deploy/gone.py.\n"
        "adapt_deploy.runtime.colors.colorize and adapt_deploy.runtime.colors.PALETTE,\n"
        "adapt_deploy.runtime.overlay, adapt_deploy.runtime.absent, adapt_deploy.nowhere.x\n"
        "bench/results/kernel_choice.json, bench/results/never.md, bench/.work/x/y.mp4\n"
        "python -m bench.kernels; python -m bench.missing; adapt_deploy_ros/x.py\n"
    )
    assert missing_paths(text, tmp_path) == [
        "adapt_deploy.nowhere.x",
        "adapt_deploy.runtime.absent",
        "adapt_deploy/gone.py",
        "bench.missing",
        "bench/results/never.md",
    ]


@pytest.mark.parametrize(
    ("source", "name", "expected"),
    [
        ("def f():\n    pass\n", "f", True),
        ("class C:\n    pass\n", "C", True),
        ("X = 1\n", "X", True),
        ("X: int = 1\n", "X", True),
        ("X == 1\n", "X", False),
        ("from a import b as X\n", "X", True),
        ("from a import X as b\n", "X", False),
        ("import a.X\n", "X", False),
        ("def fx():\n    pass\n", "f", False),
    ],
)
def test_defines(source: str, name: str, expected: bool):
    assert _defines(source, name) is expected
