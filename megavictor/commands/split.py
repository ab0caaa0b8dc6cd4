"""`megavictor split --config C --pp N [overrides]` (formerly `megavictor plan`): the pipeline stage split, `even`
vs `balanced`, and each stage's predicted cost under the cost model of `megavictor.model.pipeline_split`; one JSON
object last."""

from __future__ import annotations

import argparse
import json

from megavictor.config import load_config
from megavictor.model.pipeline_split import sample_shape, split_report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor split", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--pp", type=int, help="pipeline stages (overrides parallel.pp)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. victor.drop_layer=5")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"parallel.pp={args.pp}"] if args.pp else [])
    cfg = load_config(args.config, overrides)
    report = split_report(cfg)
    shape = sample_shape(cfg)
    print(f"{cfg.model.num_layers} layers on {cfg.parallel.pp} stages; per sample {shape.visual:g} visual + "
          f"{shape.registers:g} registers + {shape.text:g} text slots"
          f"{' (anyres: the largest grid)' if cfg.vision.anyres() else ''}; victor "
          f"{'on, drop at layer ' + str(cfg.victor.drop_layer) if cfg.victor.enabled else 'off'}")
    print("stage cost is relative to the mean stage cost of the even split")
    for name in ("even", "balanced"):
        print(f"{name:>9}: layers {report[name]['layers']}  stage cost {report[name]['stage_cost']}")
    print(f"predicted speedup of balanced over even: {report['speedup']:.2f}x")
    print(json.dumps(report))
    return 0
