"""How a failed save or load is reported: one short phrase, whichever rank or process it failed in."""

from __future__ import annotations

from trainer.errors import UserError


class SaveFailed(Exception):
    """A save that failed elsewhere (the writer process); the message is the reason, already short."""


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the per-rank failures a DCP ``CheckpointException`` wraps, and the chain of causes."""
    seen: list[BaseException] = [exc]
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: exception}
    if isinstance(failures, dict):  # values are (exception, traceback summary) pairs
        seen += [value[0] if isinstance(value, tuple) else value for value in failures.values()]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    return seen


def root_cause(exc: BaseException) -> str:
    """The innermost OS error of a (possibly wrapped, per-rank) DCP failure, as one short phrase."""
    seen = _causes(exc)
    for candidate in seen:
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror
    text = str(seen[-1]).strip()
    return text.splitlines()[-1] if text else type(seen[-1]).__name__


def user_error_inside(exc: BaseException) -> UserError | None:
    """The ``UserError`` a reader raised inside ``dcp.load`` (which wraps it per rank), if any."""
    return next((candidate for candidate in _causes(exc) if isinstance(candidate, UserError)), None)
