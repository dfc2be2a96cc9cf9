"""The private parts of torchrun's agent and of torch's multiprocessing that the agent hooks into,
in one place, each with a test in ``tests/test_torch_compat.py`` that fails when torch changes it.

- ``LocalElasticAgent._monitor_workers``: how the agent looks at its workers (every 0.1 s), and its
  ``_remaining_restarts``;
- ``ProcessContext._join_procs_with_timeout``: how torch's multiprocessing waits for the rest of a
  group of forked workers after one of them failed (then SIGTERM, 30 s, SIGKILL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
MARK = "fsdp_train_hook"  # set on a wrapper: a second install replaces it instead of wrapping it again


def _install(cls: type, name: str, wrap: Wrap) -> None:
    current = getattr(cls, name)
    original = current.__wrapped__ if getattr(current, MARK, False) else current
    hooked = wrap(original)
    setattr(hooked, MARK, True)
    setattr(cls, name, hooked)


def hook_monitor_workers(wrap: Wrap) -> None:
    """Replace ``LocalElasticAgent._monitor_workers(self, worker_group) -> RunResult`` by
    ``wrap(original)`` (which must keep ``__wrapped__``, as ``functools.wraps`` does)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    _install(LocalElasticAgent, "_monitor_workers", wrap)


def restarts_left(agent: Any) -> int:
    return agent._remaining_restarts


def end_restarts(agent: Any) -> None:
    """No restart after this failure: the agent gives up, as when its restarts are used up."""
    agent._remaining_restarts = 0


def hook_join_after_failure(wrap: Wrap) -> None:
    """Replace ``ProcessContext._join_procs_with_timeout(self, timeout)`` by ``wrap(original)``."""
    from torch.multiprocessing.spawn import ProcessContext

    _install(ProcessContext, "_join_procs_with_timeout", wrap)
