"""`megavictor split --config C --pp N [--data DIR] [overrides]` (formerly `megavictor plan`): the pipeline stage
split, `even` vs `balanced`, and each stage's predicted cost under the cost model of
`megavictor.model.pipeline_split` (for one typical sample, or with `--data` the data set's samples); one JSON object
last."""

from __future__ import annotations

import argparse
import json

from megavictor.config import Config, load_config
from megavictor.distributed import ParallelDims
from megavictor.model.pipeline_split import SampleShape, sample_shape, split_report


def data_sample_shape(cfg: Config) -> SampleShape:
    """The training split's sample moments, as a training job's balanced split sees them (the index only: nothing
    is decoded)."""
    from megavictor.data.training_data import SplitData

    one_process = ParallelDims(world=1, rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    return SplitData(cfg, cfg.data.train_split, one_process, shuffle=True, epochs=None).order.sample_shape()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megavictor split", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--pp", type=int, help="pipeline stages (overrides parallel.pp)")
    parser.add_argument("--data", help="a prepared data set (overrides data.path): weigh the stages by its training "
                                       "split's samples, as training does, instead of one typical sample")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. victor.drop_layer=5")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"parallel.pp={args.pp}"] if args.pp else [])
    overrides += [f"data.path={json.dumps(args.data)}"] if args.data else []
    cfg = load_config(args.config, overrides)
    shape = data_sample_shape(cfg) if args.data else sample_shape(cfg)
    report = split_report(cfg, shape)
    source = (f"mean over {cfg.data.path}'s {cfg.data.train_split} split" if args.data
              else "the largest grid (anyres)" if cfg.vision.anyres() else "one typical sample")
    print(f"{cfg.model.num_layers} layers on {cfg.parallel.pp} stages; per sample {shape.visual:.6g} visual + "
          f"{shape.registers:.6g} registers + {shape.text:.6g} text slots ({source}); victor "
          f"{'on, drop at layer ' + str(cfg.victor.drop_layer) if cfg.victor.enabled else 'off'}")
    print("stage cost is relative to the mean stage cost of the even split")
    for name in ("even", "balanced"):
        print(f"{name:>9}: layers {report[name]['layers']}  stage cost {report[name]['stage_cost']}")
    print(f"predicted speedup of balanced over even: {report['speedup']:.2f}x")
    print(json.dumps(report))
    return 0
