"""`megavictor <verb>`: one command, one verb per job. Each verb lives in its own module and takes its argv."""

from __future__ import annotations

import importlib
import os
import sys

from megavictor.errors import UserError

# verb -> (module, help). Modules are imported only when their verb runs, so `megavictor split` stays light.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("megavictor.demo", "prepare the digits data, train stage 1 + 2 on CPU, print test accuracy"),
    "train": ("megavictor.training.job", "train (single process, or under torchrun / SLURM for tp x pp x dp)"),
    "eval": ("megavictor.vqa", "greedy VQA answers from a checkpoint, exact-match accuracy as JSON"),
    "convert": ("megavictor.commands.convert", "HF checkpoints <-> megavictor checkpoints (from-hf, to-hf)"),
    "launch": ("launch.cli", "submit a training run to SLURM (or --cluster local) via submitit"),
    "split": ("megavictor.commands.split", "pipeline stage split and predicted per-stage cost (even vs balanced)"),
    "prep": ("data_prep.cli", "turn image-text data into WebDataset shards"),
    "bench": ("megavictor.benchmarks.cli", "benchmarks (loader, ...) printing a JSON line last"),
}


# Old verb names, kept working: old -> new.
RENAMED_VERBS = {"plan": "split"}  # "plan" is the drop plan in code and docs; the verb splits the pipeline


def usage() -> str:
    lines = ["usage: megavictor <verb> [args]", "", "verbs:"]
    lines += [f"  {verb:<8} {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in RENAMED_VERBS:
        print(f"megavictor: `megavictor {verb}` is deprecated; use `megavictor {RENAMED_VERBS[verb]}`", file=sys.stderr)
        verb = RENAMED_VERBS[verb]
    if verb not in VERBS:
        print(f"megavictor: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(VERBS[verb][0]).main(rest) or 0)
    except UserError as exc:  # one line naming the key or file and what to do; a traceback only when debugging
        if os.environ.get("MEGAVICTOR_DEBUG") == "1":
            raise
        print(f"megavictor {verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
