"""The chart's values table in docs/kubernetes.md, generated from the `# --` comments in values.yaml.

A key with a `# --` comment right above it is one row: its dotted path, its default (the parsed
value, as YAML flow) and the comment. Mappings without such a comment are only a prefix of their
children's paths. `python hack/values_table.py` rewrites the table between the page's markers;
`--check` exits 1 naming what differs (make lint runs it, and so does a test).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "helm" / "fsdp-train" / "values.yaml"
README = ROOT / "docs" / "kubernetes.md"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):")


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted path, description) of every key that has a `# --` comment above it, in file order."""
    rows, path, comment = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
        elif stripped.startswith("#") and comment is not None:
            comment.append(stripped[1:].strip())
        elif match := KEY.match(line):
            depth = len(match["indent"]) // 2
            path = path[:depth] + [match["key"]]
            if comment is not None:
                rows.append((".".join(path), " ".join(comment)))
            comment = None
        elif not stripped:
            comment = None
    return rows


def undocumented(values_text: str) -> list[str]:
    """Values that no row covers: neither they nor a mapping above them has a `# --` comment."""
    documented = {dotted for dotted, _ in documented_keys(values_text)}

    def walk(tree: dict, prefix: str) -> list[str]:
        missing = []
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if dotted in documented:
                continue
            if isinstance(value, dict) and value:
                missing += walk(value, dotted + ".")
            else:
                missing.append(dotted)
        return missing

    return walk(yaml.safe_load(values_text), "")


def lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def flow(value) -> str:
    """A default as it would be written in values.yaml, on one line."""
    if value == "":
        return '""'
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("\n...")


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    lines = ["| value | default | description |", "|---|---|---|"]
    for dotted, description in documented_keys(values_text):
        default = flow(lookup(values, dotted))
        if len(default) > 60:
            default = "see `values.yaml`"
        else:
            default = f"`{default}`".replace("|", "\\|")
        lines.append(f"| `{dotted}` | {default} | {description.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def with_table(readme: str, generated: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{README.relative_to(ROOT)} has no {BEGIN} ... {END} markers around the values table")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{generated}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the table in docs/kubernetes.md is stale")
    parser.add_argument("--values", type=Path, default=VALUES, help=argparse.SUPPRESS)
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    values_text = args.values.read_text()
    if missing := undocumented(values_text):
        print(f"{args.values.name}: no `# --` comment for {', '.join(missing)}", file=sys.stderr)
        return 1
    readme = args.readme.read_text()
    updated = with_table(readme, table(values_text))
    if updated == readme:
        return 0
    if args.check:
        print(f"{args.readme.name}'s values table differs from {args.values.name}: run `make values-table`",
              file=sys.stderr)
        return 1
    args.readme.write_text(updated)
    print(f"{args.readme.name}: values table regenerated from {args.values.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
