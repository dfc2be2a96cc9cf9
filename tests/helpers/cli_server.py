"""A warm ``fsdp-train`` for the test suite (``conftest.run_cli``): this process imports torch, the
trainer and its tools once, then runs each command line it is sent in a child forked from it.

A fresh interpreter pays seconds for those imports, on every one of the suite's few hundred command
lines; a fork costs milliseconds. The child is a process of its own, as ``python -m trainer ARGS``
would be: its own environment, working directory, output files and exit code. Its atexit handlers
run; the interpreter's teardown of its modules does not. What this cannot show (the console script,
``python -m trainer`` itself, a fresh interpreter's imports) the tests that start ``python -m trainer``
(``conftest.start_cli``, ``run_python``), the image tests and the end-to-end runs cover.

Protocol, one command at a time: a JSON line ``{"argv", "env", "cwd", "out", "err"}`` on stdin; on
stdout ``{"pid": PID}`` once forked, then ``{"status": CODE}`` once it ended (``-N``: signal N).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import traceback

# what the command lines of the suite import: the CLI, the launcher (local's preflight), the tools
PRELOAD = ("torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "trainer.cli", "trainer.launcher.launch",
           "trainer.tools.inference", "trainer.tools.convert", "trainer.tools.inspect_ckpt", "trainer.tools.monitor",
           "trainer.tools.hf_export", "trainer.data.prepare", "trainer.models.hf", "transformers")


def exit_code(code: object) -> int:
    """What the interpreter makes of ``SystemExit(code)``: None is 0; a message is printed, then 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_command(request: dict) -> None:
    """In the forked child: become ``python -m trainer ARGV`` in ``request``'s place; never returns."""
    code = 1
    try:
        for fd, path in ((1, request["out"]), (2, request["err"])):
            opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [os.path.join(request["cwd"], "trainer", "__main__.py"), *request["argv"]]
        from trainer.cli import main

        try:
            code = exit_code(main(request["argv"]))
        except SystemExit as exc:
            code = exit_code(exc.code)
        except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then 1
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # a command reads no input, and writes
    os.dup2(2, 1)  # nothing stray into the replies
    for name in PRELOAD:
        importlib.import_module(name)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            run_command(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":  # not when a spawned child (prepare-data's) imports this as its main module
    serve()
