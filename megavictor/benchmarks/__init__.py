"""`megavictor bench <what>` benchmarks, one module each: loader, train, infer, pipeline, accuracy (the verb's
dispatcher: `megavictor.benchmarks.cli`)."""
