"""The last worker failure, handed from the agent to the workers it restarts: a small JSON file
whose path the workers inherit in ``FAILURE_FILE_ENV``, read into their start record's
``recovered_from``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAILURE_FILE_ENV = "FSDP_TRAIN_FAILURE_FILE"


def write_failure(path: Path, failure: dict[str, Any]) -> None:
    """Replace the file atomically: a worker never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(failure))
    os.replace(tmp, path)


def read_failure(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The failure the agent recorded for this start, if any (a worker's view)."""
    path = (environ if environ is not None else os.environ).get(FAILURE_FILE_ENV)
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None
