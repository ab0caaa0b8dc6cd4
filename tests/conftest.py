"""Session fixtures shared by the test modules: the digits data set, the tiny HF sources, the single-process
reference run and the test SLURM cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.slurm_cluster import Paths

DIGITS_MAXCOUNT = 170  # small shards: every split has several, and counts that do not divide by 4 readers
VISION_STEPS = 200  # the demo's vision pretraining, shortened (the default 600 steps take ~30 s)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits data set, prepared once per session (via the CLI entry point)."""
    from data_prep.cli import main

    out = tmp_path_factory.mktemp("digits")
    assert main(["digits", "--out", str(out), "--maxcount", str(DIGITS_MAXCOUNT),
                 "--vision-steps", str(VISION_STEPS)]) == 0
    return out


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random HF Llama (with its tokenizer) and CLIP vision tower (`tests.hf_fixtures.build_sources`)."""
    from tests.hf_fixtures import build_sources

    return build_sources(tmp_path_factory.mktemp("hf_sources"))


@pytest.fixture(scope="session")
def reference_run(digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """tests/runs.py's tiny demo run (10 steps, checkpoints at 5 and 10) in one process, trained once per session:
    the losses every other layout, launcher and resume must reproduce."""
    from tests.runs import run, train_cmd

    run_dir = tmp_path_factory.mktemp("tp1pp1")
    return run_dir, run(train_cmd(1, digits_data, run_dir, "train.save_interval=5"))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Paths]:
    """The running two-node test cluster (tests/slurm_cluster.py; .ci/run starts it), or one started for this session
    and stopped at its end. Errors, never skips, when SLURM cannot start: CI must not pass without
    the SLURM tests."""
    from tests.slurm_cluster import session

    with session(nodes=2) as paths:
        yield paths


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist's `loadgroup` (pytest.ini), a module's tests run on one worker, so its module fixtures are
    built once; the SLURM modules name one group ("slurm"): they share the one test cluster."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
