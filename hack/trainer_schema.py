"""The JSON schema of the chart's `trainer` mapping, generated from `TrainConfig`.

Every setting of `fsdp-train train` is a key of its type (with its choices, if any) and its help as
the description; any other key is refused, so `helm install --set trainer.max_step=10` fails at
install time, naming the key, instead of the pods at start-up. The settings the chart fills in from
other values (`OWNED_BY_CHART`) are left out, so setting them under `trainer` is refused too.
`python hack/trainer_schema.py` rewrites `values.schema.json`; `--check` exits 1 if it is stale
(make lint runs it, and so does a test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.config import AUTO, TrainConfig  # noqa: E402  (after the path is set)

SCHEMA = ROOT / "helm" / "fsdp-train" / "values.schema.json"
# trainer settings the chart sets itself, and the value each comes from
OWNED_BY_CHART = {"checkpoint_dir": "checkpoint.dir", "checkpoint_every": "checkpoint.every",
                  "snapshot_every": "memoryTier.every", "device": "gpu.enabled"}
TYPES: dict[str, dict[str, Any]] = {
    "int": {"type": "integer"}, "float": {"type": "number"}, "bool": {"type": "boolean"}, "str": {"type": "string"},
    "dict": {"type": "object"}, "str | None": {"type": ["string", "null"]}, "int | None": {"type": ["integer", "null"]},
    "int | str": {"anyOf": [{"type": "integer", "minimum": 0}, {"enum": [AUTO]}]},
}


def trainer_schema() -> dict[str, Any]:
    properties = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in OWNED_BY_CHART:
            continue
        entry = dict(TYPES[str(field.type)])
        if choices := field.metadata.get("choices"):
            entry["enum"] = list(choices) + ([None] if str(field.type).endswith("| None") else [])
        entry["description"] = field.metadata["help"]
        properties[field.name] = entry
    owned = ", ".join(f"{name} ({source})" for name, source in OWNED_BY_CHART.items())
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": f"fsdp-train train settings (YAML keys of --config); set by the chart from other "
                           f"values: {owned}"}


def rendered() -> str:
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["trainer"] = trainer_schema()
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if values.schema.json is stale")
    args = parser.parse_args()
    text = rendered()
    if args.check:
        if SCHEMA.read_text() != text:
            print(f"{SCHEMA.relative_to(ROOT)}: the trainer schema differs from TrainConfig; run "
                  "`python hack/trainer_schema.py`", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
