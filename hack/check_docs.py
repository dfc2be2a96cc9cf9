"""The docs hold together: every relative link in README.md, docs/ and the package maps resolves (a
file, and a heading for a `#fragment`), and every `fsdp-train` subcommand is documented in docs/.

`python hack/check_docs.py` prints each problem and exits 1 if there is any (make lint runs it, and
so does a test).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "trainer").rglob("README.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken_links() -> list[str]:
    problems = []
    for page in pages():
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:: not checked here
                continue
            path, _, fragment = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: link {target}"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    return problems


def subcommands() -> list[str]:
    """Every `fsdp-train` subcommand, with its own subcommands (``ckpt list``), from the CLI's parser."""
    from trainer.cli import build_parser

    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{prefix} {name}")
                return
        found.append(prefix.strip())

    walk(build_parser(), "")
    return found


def undocumented_commands() -> list[str]:
    docs = "\n".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))
    return [f"docs/: `fsdp-train {command}` is documented nowhere" for command in subcommands()
            if f"fsdp-train {command}" not in docs]


def main() -> int:
    problems = broken_links() + undocumented_commands()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
