"""`megavictor bench <what>` benchmarks, one module each: train, infer, pipeline (`megavictor.bench.BENCHES`)."""
