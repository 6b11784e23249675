"""The documentation stays inside the repository: every relative link resolves to a file a clone has, and no file
points at the reference document that lived outside it (the model is described in docs/MODEL.md).

Links are read from README.md, shards/README.md and docs/*.md: inline links and images `[..](path)`,
`![..](path)`, reference definitions `[id]: path` and HTML `src=` / `href=`, outside code blocks and code spans.
`http(s)://` and `mailto:` links are skipped; any other link must be relative, stay under the repository root,
name an existing file or folder (after dropping `#anchor` and `?query`) and not be ignored by git.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({ROOT / "README.md", ROOT / "shards" / "README.md", *(ROOT / "docs").glob("*.md")})

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)  # fenced code blocks
_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1", re.S)  # inline code spans
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)")  # [text](target "title"), ![alt](target), nested ones too
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.M)  # [id]: target
_HTML = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_WEB = ("http://", "https://", "mailto:")

# Built by concatenation so that this file does not name them itself.
_FORBIDDEN = re.compile(r"\b" + "SPEC" + r"\.md\b" + "|" + r"\.\." + "[/\\\\]" + "shared" + r"\b", re.I)
_SKIP_DIRS = {".venv", "venv", ".git", "runs", "__pycache__", ".pytest_cache", "build", "dist", "node_modules"}


def _strip_code(text: str) -> str:
    """The Markdown text without fenced code blocks and inline code spans (a `[..](..)` in code is no link).

    A code span inside link text (`` [`x`](path) ``) leaves `[](path)`, still found as a link."""
    return _SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link and image target of a Markdown text, in order of appearance (duplicates kept)."""
    body = _strip_code(text)
    found = [(m.start(), m.group(1)) for pattern in (_INLINE, _REFERENCE, _HTML) for m in pattern.finditer(body)]
    return [target for _, target in sorted(found)]


def _git(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str] | None:
    """A git command in ROOT, or None where git or the repository is missing (an unpacked archive)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    return subprocess.run(["git", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, check=False,
                          timeout=60)


def _ignored(paths: list[Path]) -> set[Path]:
    """The paths git ignores (so a clone lacks them); empty without git."""
    if not paths:
        return set()
    result = _git("check-ignore", "--stdin", stdin="\n".join(str(p.relative_to(ROOT)) for p in paths) + "\n")
    if result is None or result.returncode not in (0, 1):
        return set()
    return {(ROOT / line).resolve() for line in result.stdout.splitlines() if line}


def link_problems(doc: Path) -> list[str]:
    """What is wrong with `doc`'s links, one line each: absolute, outside the root, missing, or ignored by git."""
    problems, local = [], []
    for target in links(doc.read_text(encoding="utf-8")):
        where = f"{doc.relative_to(ROOT)}: ({target})"
        if target.lower().startswith(_WEB):
            continue
        if _SCHEME.match(target):
            problems.append(f"{where} uses a scheme other than http(s) or mailto")
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:
            continue  # a link to an anchor of the same page
        if path.startswith(("/", "\\")):
            problems.append(f"{where} is absolute; links must be relative")
            continue
        resolved = (doc.parent / path).resolve()
        if resolved != ROOT and ROOT not in resolved.parents:
            problems.append(f"{where} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where} does not exist")
        else:
            local.append((where, resolved))
    ignored = _ignored([resolved for _, resolved in local])
    problems += [f"{where} is ignored by git, so a clone lacks it" for where, resolved in local if resolved in ignored]
    return problems


def tracked_text_files() -> list[Path]:
    """The .py, .md, .yaml and .sh files a clone has: git's tracked and untracked-but-not-ignored ones (so new files count),
    or, without git, a walk of the tree that skips virtual environments, runs and shard sets."""
    result = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if result is not None and result.returncode == 0:
        names = [ROOT / name for name in result.stdout.split("\0") if name]
    else:
        names = []
        for folder, dirs, files in os.walk(ROOT):
            here = Path(folder)
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")
                       and not (here == ROOT / "shards")]  # shards/*/ are written shard sets
            names += [here / f for f in files]
    return sorted(p for p in names if p.suffix in (".py", ".md", ".yaml", ".sh") and p.is_file())


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    problems = link_problems(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_links_the_model_document() -> None:
    targets = [t.split("#", 1)[0] for t in links((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert "docs/MODEL.md" in targets
    assert (ROOT / "docs" / "MODEL.md").is_file()


def test_no_file_cites_the_reference_outside_the_repository() -> None:
    offending = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if _FORBIDDEN.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offending, ("these cite a document outside the repository; point them at docs/MODEL.md instead:\n"
                           + "\n".join(offending))


def test_the_link_reader() -> None:
    text = ("See [`a`](docs/A.md#x), ![img](b.png \"t\") and [![badge](c.svg)](https://e.org).\n"
            "[ref]: ./d.md\n<img src=\"e.png\">\n```\n[code](not/a/link.md)\n```\n`[span](no.md)`\n")
    assert links(text) == ["docs/A.md#x", "b.png", "c.svg", "https://e.org", "./d.md", "e.png"]
    assert _FORBIDDEN.search("SPEC" + ".md") and _FORBIDDEN.search(".." + "/shared/x")
    assert not _FORBIDDEN.search("check SPEC") and not _FORBIDDEN.search("shared fixtures")
