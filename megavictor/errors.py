"""The one base class of user errors, and one-line notices to the user.

A `UserError` means what the user gave (config, data, paths, checkpoints) is wrong: `megavictor <verb>` prints it as
one line naming the key or file and what to do, and exits with code 2, without a traceback (set MEGAVICTOR_DEBUG=1
to see one). Everything else is a bug and keeps its traceback. A notice is what the job did about a problem it
recovered from (a damaged checkpoint skipped, a torn metrics line dropped): one line on stderr, from rank 0 only.
"""

import os
import sys


class UserError(Exception):
    """A mistake in the user's input; the message names the key, file or record and what to do."""


def notice(message: str) -> None:
    """One line on stderr, printed by the job's rank 0 (every rank of a job reaches the same conclusions)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"megavictor: {message}", file=sys.stderr, flush=True)
