"""`megavictor convert from-hf|to-hf`: Hugging Face checkpoints <-> megatron distributed checkpoints.

    megavictor convert from-hf --llm DIR --vision DIR --out CKPT [--tp N --pp N] [--config YAML] [key=value ...]
    megavictor convert from-hf --llava DIR --out CKPT ...
    megavictor convert to-hf --checkpoint CKPT --out DIR [--tokenizer DIR] [--max-shard-size 5GB]

`to-hf` also takes a DeepSpeed-engine checkpoint (its ZeRO shards are gathered); a `from-hf` checkpoint initialises
runs of either engine (`train.init_from`). The megatron side (`megavictor.checkpoint`) is imported only when a
conversion runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from megavictor.errors import UserError
from megavictor.hf.convert import complete_state, config_from_sections, from_hf, from_hf_llava, source_of, to_hf


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="megavictor convert", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("from-hf", help="HF LLM + CLIP (or a LLaVA dir) -> megatron checkpoint")
    imp.add_argument("--llm", help="Llama, Mistral or Qwen2 causal LM dir (safetensors), with its tokenizer")
    imp.add_argument("--vision", help="CLIP or CLIPVisionModel dir; LLaVA's feature layer (-2) is kept")
    imp.add_argument("--llava", help="llava-hf LLaVA-1.5 / LLaVA-NeXT or exported Victor LLaVA dir (instead of the "
                     "two)")
    imp.add_argument("--out", required=True, help="megatron checkpoint dir to write")
    imp.add_argument("--tp", type=int, help="tensor-parallel size to shard for (default: the config's)")
    imp.add_argument("--pp", type=int, help="pipeline-parallel size to shard for (default: the config's)")
    imp.add_argument("--config", help="YAML recipe for everything the HF weights do not fix")
    imp.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    imp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. victor.num_registers=16")
    exp = sub.add_parser("to-hf", help="megavictor checkpoint -> HF dir (Victor: with remote code)")
    exp.add_argument("--checkpoint", required=True,
                     help="megatron or DeepSpeed checkpoint (step, checkpoints or run dir)")
    exp.add_argument("--out", required=True, help="HF dir to write")
    exp.add_argument("--tokenizer", help="tokenizer dir to ship (default: the one the checkpoint recorded)")
    exp.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    exp.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    return top


def write_into(out: Path, force: bool, write: Callable[[Path], object]) -> None:
    """Run `write(folder)` into a temporary folder beside `out`, then rename it into place: `out` ends up either as
    it was or complete, never half written. A non-empty `out` is replaced only with `--force` (its old content is
    removed after the new one is in place); a write that fails (a full disk) removes the temporary folder and says
    so in one line."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise UserError(f"--out {out} is not empty (it holds {held}...); choose a new folder, or pass --force to "
                        "replace it")
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write(tmp)
    except BaseException as exc:  # a full disk, a quota, an interrupt: nothing half written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free / 2**30
        raise UserError(f"writing {out} failed ({exc.strerror or exc}); {free:.2f} GiB left there; --out was not "
                        "changed") from exc
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_tokenizer(recorded: Path | None, checkpoint: Path, given: str | None) -> Path:
    """`--tokenizer`, else the one the checkpoint recorded; never a guess (such as a data set in the working dir)."""
    from megavictor.checkpoint import CheckpointError

    if given:
        return Path(given)
    if recorded is None:
        raise CheckpointError(f"{checkpoint} records no tokenizer (its source HF dir had none, or it predates "
                              "tokenizer records); pass --tokenizer DIR with the tokenizer its LLM was trained with")
    return recorded


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(sys.argv[1:] if argv is None else argv)
    from megavictor.checkpoint import load_full_state, resolve, save_full_state
    from megavictor.checkpoint.hf_source import hf_dir_source, read_source

    if args.direction == "from-hf":
        if args.llava and not (args.llm or args.vision):
            sections, state = from_hf_llava(args.llava)
            source = hf_dir_source(args.llava, *source_of(llava_dir=args.llava))
        elif args.llm and args.vision and not args.llava:
            sections, state = from_hf(args.llm, args.vision)
            source = hf_dir_source(args.llm, *source_of(args.llm, args.vision))
        else:
            cli.error("give either --llm and --vision, or --llava")
        parallel = [f"parallel.{key}={value}" for key, value in (("tp", args.tp), ("pp", args.pp))
                    if value is not None]
        cfg = config_from_sections(sections, args.config, args.overrides + parallel)
        state = complete_state(cfg, state, seed=cfg.train.seed)
        write_into(Path(args.out), args.force,
                   lambda tmp: save_full_state(cfg, state, tmp, cfg.parallel.tp, cfg.parallel.pp, source=source))
        recorded = f"tokenizer of {source.tokenizer}" if source.tokenizer else "no tokenizer (the source has none)"
        print(f"wrote {args.out} (tp={cfg.parallel.tp}, pp={cfg.parallel.pp}, {len(state)} tensors, {recorded})")
    else:
        checkpoint = resolve(args.checkpoint)
        source = read_source(checkpoint)
        tokenizer = export_tokenizer(source.tokenizer, checkpoint, args.tokenizer)
        cfg, state = load_full_state(checkpoint)
        out = Path(args.out)
        write_into(out, args.force, lambda tmp: to_hf(cfg, state, tmp, tokenizer_dir=tokenizer,
                                                     max_shard_size=args.max_shard_size, source=source.config,
                                                     vision_tail=source.vision_tail))
        kind = f"LLaVA{'-NeXT' if cfg.vision.anyres() else ''}"
        print(f"wrote {out} ({f'Victor {kind}, trust_remote_code' if cfg.victor.enabled else f'stock {kind}'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
