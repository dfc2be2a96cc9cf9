"""How a failed save is reported: one short phrase, whichever rank or process it failed in."""

from __future__ import annotations


class SaveFailed(Exception):
    """A save that failed elsewhere (the writer process); the message is the reason, already short."""


def root_cause(exc: BaseException) -> str:
    """The innermost OS error of a (possibly wrapped, per-rank) DCP failure, as one short phrase."""
    seen: list[BaseException] = [exc]
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: exception}
    if isinstance(failures, dict):  # values are (exception, traceback summary) pairs
        seen += [value[0] if isinstance(value, tuple) else value for value in failures.values()]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    for candidate in seen:
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror
    text = str(seen[-1]).strip()
    return text.splitlines()[-1] if text else type(seen[-1]).__name__
