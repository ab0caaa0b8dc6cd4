"""A stop request (SIGTERM / SIGUSR2 / a first Ctrl-C, or a call): the training loop checkpoints at the next step
boundary and returns. A second Ctrl-C stops at once, without saving (`interrupt`).

Kept apart from the loop so that the job's entry point and launchers can install the handlers without importing
torch or megatron.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from megavictor.errors import notice

_stop = threading.Event()
_interrupted = threading.Event()
SECOND_INTERRUPT = ("megavictor: stopped by a second interrupt, without saving; the run resumes from its last "
                    "checkpoint\n")


def request_stop(*_args: Any) -> None:
    """Ask the running job to checkpoint at the next step boundary and return (signal-handler safe)."""
    _stop.set()


def interrupt(*_args: Any) -> None:
    """SIGINT (Ctrl-C): the first asks for a checkpoint at the next step boundary, as SIGTERM does; a second one
    ends the process at once, exit code 130, without saving.

    It exits rather than raising KeyboardInterrupt: Python runs a signal handler between two bytecodes of whatever
    the main thread runs, which may be a finalizer or a fork callback (a checkpoint save forks its writer), where an
    exception is printed and dropped; the run then went on, saved and exited 0. Exiting at once is what kill -9 does,
    and a save cut short that way is never taken for a checkpoint (`megavictor.checkpoint.commit`); forked helpers
    die with the process (`megavictor.process_lifetime`)."""
    if _interrupted.is_set():
        os.write(2, SECOND_INTERRUPT.encode())
        os._exit(130)
    _interrupted.set()
    _stop.set()
    notice("interrupted: saving a checkpoint at the next step boundary, then stopping (Ctrl-C again to stop at once "
           "without saving)")


def clear_stop_request() -> None:
    _stop.clear()
    _interrupted.clear()


def stop_pending() -> bool:
    """Whether this process was asked to stop (the loop agrees on it across ranks)."""
    return _stop.is_set()
