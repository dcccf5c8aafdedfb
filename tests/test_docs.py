"""The user-facing docs: relative links and anchors resolve, and the make targets they name exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _without_code_blocks(path.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        text = _without_code_blocks(doc.read_text(encoding="utf-8"))
        # [text](path) and [text](<path with spaces>), as CommonMark writes them
        for angled, plain in re.findall(r"\]\((?:<([^>]+)>|([^)\s]+))\)", text):
            target = angled or plain
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_make_targets_named_in_the_docs_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme  # the two commands a developer starts with
    # as a command: in `make x`, or at the start of a line in a code block
    named = {name for doc in DOCS
             for name in re.findall(r"(?:^|`)make ([a-z][\w-]*)", doc.read_text(encoding="utf-8"), flags=re.M)}
    assert named - targets == set(), f"the docs name make targets the Makefile lacks: {sorted(named - targets)}"
