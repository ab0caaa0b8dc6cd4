"""`megavictor bench <what>`: each benchmark prints a human table and one JSON object as its last stdout line.

Every benchmark takes trailing `section.key=value` config overrides, applied on top of its own configuration, as
`megavictor train` does. Each module has `build_parser()` (its flags, pinned by tests/test_interface.py) and
`main(argv)`.
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "loader": "megavictor.benchmarks.loader",
    "train": "megavictor.benchmarks.train",
    "infer": "megavictor.benchmarks.infer",
    "serve": "megavictor.benchmarks.serve",
    "pipeline": "megavictor.benchmarks.pipeline",
    "accuracy": "megavictor.benchmarks.accuracy",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: megavictor bench {{{','.join(BENCHES)}}} [args] [section.key=value ...]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
