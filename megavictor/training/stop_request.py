"""A stop request (SIGTERM / SIGUSR2, or a call): the training loop checkpoints at the next step boundary and returns.

Kept apart from the loop so that the job's entry point and launchers can install the handlers without importing
torch or megatron.
"""

from __future__ import annotations

import threading
from typing import Any

_stop = threading.Event()


def request_stop(*_args: Any) -> None:
    """Ask the running job to checkpoint at the next step boundary and return (signal-handler safe)."""
    _stop.set()


def clear_stop_request() -> None:
    _stop.clear()


def stop_pending() -> bool:
    """Whether this process was asked to stop (the loop agrees on it across ranks)."""
    return _stop.is_set()
