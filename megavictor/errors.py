"""The one base class of user errors: what the user gave (config, data, paths, checkpoints) is wrong.

`megavictor <verb>` prints such an error as one line naming the key or file and what to do, and exits with code 2,
without a traceback (set MEGAVICTOR_DEBUG=1 to see one). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the key, file or record and what to do."""
