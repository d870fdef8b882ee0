"""Every relative link in README.md and docs/*.md points at a file that exists (and, for a
Markdown target with a #fragment, at a heading that exists there), and every repository path
(`cfcml/engine/run.py`) or module (`cfcml.engine.run.train_one`) the pages quote exists, so
moving text or code cannot leave a dead link, a missing image or a stale name behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
REPO_DIRS = ("cfcml/", "tests/", "jobs/", "benchmarks/", "scripts/", "cluster/", "mlflow/", "examples/", "docs/")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '# comment' in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in _prose_lines(page.read_text()):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug, n = _slug(m.group(1)), 1
            while slug in found:  # repeated headings get -1, -2, ...
                slug, n = f"{_slug(m.group(1))}-{n}", n + 1
            found.add(slug)
    return found


def relative_links(page: Path) -> list[str]:
    prose = "\n".join(_prose_lines(page.read_text()))
    prose = re.sub(r"`[^`\n]*`", "", prose)  # links quoted as code are examples, not links
    return [t for t in LINK.findall(prose) if not EXTERNAL.match(t)]


def test_the_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "architecture.md", "platform.md", "results.md"} <= names
    assert all(relative_links(p) for p in PAGES if p.name in {"README.md", "results.md"})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: dead links:\n" + "\n".join(broken)


def test_the_link_checker_catches_a_dead_link(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading — with punctuation, `code` and ±\n")
    page.write_text(
        "[ok](there.md#a-heading--with-punctuation-code-and-) [gone](missing.png) [bad](there.md#nope)\n"
        "```bash\n# not a heading [x](in-code.md)\n```\n[web](https://example.org) `[quoted](nowhere.md)`\n"
    )
    assert relative_links(page) == ["there.md#a-heading--with-punctuation-code-and-", "missing.png", "there.md#nope"]
    assert "a-heading--with-punctuation-code-and-" in anchors(tmp_path / "there.md")


def quoted_paths(page: Path) -> list[str]:
    """Repository paths quoted as code; placeholders (`<method>`, `{id}`, `*`) are patterns, not paths."""
    paths = []
    for code in re.findall(r"`([^`\n]+)`", page.read_text()):
        for token in re.findall(r"[\w./<>{}*-]+", code):
            if token.startswith(REPO_DIRS) and not re.search(r"[<>{}*]", token):
                paths.append(token.rstrip(".,:;"))
    return paths


def _defines(source: str, name: str) -> bool:
    """`name` is defined, assigned or imported (re-exported) at some level of a module's source."""
    return bool(
        re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]", source, re.MULTILINE)
        or re.search(rf"^(?:from\s+\S+\s+)?import\s+(?:\([^)]*|[^\n]*)\b{name}\b", source, re.MULTILINE)
    )


def resolves(dotted: str) -> bool:
    """`cfcml.a.b.name` names a module of the package, or something that module defines."""
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if module.exists():
            return i == len(parts) or _defines(module.read_text(), parts[i])
    return False


def quoted_modules(page: Path) -> list[str]:
    """`cfcml.<package>...` names quoted as code (MLflow tags such as `cfcml.trial_state` are not modules)."""
    packages = {p.stem for p in (ROOT / "cfcml").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    names = []
    for code in re.findall(r"`([^`\n]+)`", page.read_text()):
        names += [n for n in re.findall(r"\bcfcml(?:\.[A-Za-z_]\w*)+", code) if n.split(".")[1] in packages]
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_code_exists(page: Path):
    stale = [f"{p}: no such file" for p in quoted_paths(page) if not (ROOT / p).exists()]
    stale += [f"{m}: no such module or name" for m in quoted_modules(page) if not resolves(m)]
    assert not stale, f"{page.relative_to(ROOT)} quotes code that is not there:\n" + "\n".join(stale)


def test_the_code_checker_catches_a_stale_name(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "`cfcml/engine/run.py`, `cfcml/engine/gone.py`, `cfcml/models/methods/<method>.py`, "
        "`cfcml.engine.run.train_one`, `cfcml.engine.run.no_such_function`, `cfcml.trial_state`\n"
    )
    assert quoted_paths(page) == ["cfcml/engine/run.py", "cfcml/engine/gone.py"]
    assert quoted_modules(page) == ["cfcml.engine.run.train_one", "cfcml.engine.run.no_such_function"]
    assert resolves("cfcml.engine.run.train_one") and resolves("cfcml.engine")
    assert not resolves("cfcml.engine.run.no_such_function") and not resolves("cfcml.engine.nowhere")
