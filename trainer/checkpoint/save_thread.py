"""The save thread: runs async checkpoint saves and retention, one at a time, at the lowest CPU priority.

It writes each save itself (``--checkpoint-writer thread``) or hands it to the writer
process and waits for the answer. On a node whose cores are busy training, every
CPU-second a write takes is a CPU-second a step may wait for; nice 19 makes training
win a contested core. Linux nice values are per thread, so the writer thread alone is
lowered; it lives as long as the job, so it is started and lowered once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

BACKGROUND_NICE = 19  # the lowest priority an unprivileged process can give itself


def lower_this_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority; never the main thread, which could not get it back."""
    if threading.current_thread() is threading.main_thread():
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: the writes just compete as before
        pass


def save_thread() -> ThreadPoolExecutor:
    """A single low-priority thread: saves run one at a time, in the order they were submitted."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save",
                              initializer=lower_this_thread_priority)
