"""A stop request (SIGTERM / SIGUSR2 / a first Ctrl-C, or a call): the training loop checkpoints at the next step
boundary and returns. A second Ctrl-C stops at once, without saving (`interrupt`).

Kept apart from the loop so that the job's entry point and launchers can install the handlers without importing
torch or megatron.
"""

from __future__ import annotations

import threading
from typing import Any

from megavictor.errors import notice

_stop = threading.Event()
_interrupted = threading.Event()
_interrupted_twice = threading.Event()


def request_stop(*_args: Any) -> None:
    """Ask the running job to checkpoint at the next step boundary and return (signal-handler safe)."""
    _stop.set()


def interrupt(*_args: Any) -> None:
    """SIGINT (Ctrl-C): the first asks for a checkpoint at the next step boundary, as SIGTERM does; a second one
    stops at once (KeyboardInterrupt), without saving.

    Python runs the handler between two bytecodes of whatever the main thread runs, which may be a finalizer or a
    logging lock release, where a raised exception is printed and dropped. The second Ctrl-C is therefore also
    remembered, and `stop_pending` raises it again at the step boundary, before the save the first one asked for."""
    if _interrupted.is_set():
        _interrupted_twice.set()
        raise KeyboardInterrupt
    _interrupted.set()
    _stop.set()
    notice("interrupted: saving a checkpoint at the next step boundary, then stopping (Ctrl-C again to stop at once "
           "without saving)")


def clear_stop_request() -> None:
    _stop.clear()
    _interrupted.clear()
    _interrupted_twice.clear()


def stop_pending() -> bool:
    """Whether this process was asked to stop (the loop agrees on it across ranks); a second Ctrl-C whose
    KeyboardInterrupt was dropped is raised here."""
    if _interrupted_twice.is_set():
        raise KeyboardInterrupt
    return _stop.is_set()
