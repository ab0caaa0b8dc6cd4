"""Session fixtures shared by the test modules: the digits data set, the LLaVA-mix-shaped sets, the tiny HF
sources, the single-process reference run and the test SLURM cluster."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from filelock import FileLock

if TYPE_CHECKING:
    from tests.slurm_cluster import Paths

DIGITS_MAXCOUNT = 170  # small shards: every split has several, and counts that do not divide by 4 readers
VISION_STEPS = 200  # the demo's vision pretraining, shortened (the default 600 steps take ~30 s)
TEST_SAMPLES = 500  # vqa_test questions: the default 2500 (the fidelity protocol's) makes each full eval 5x longer
TEXT_HEAVY_MIX = ["mix", "--samples", "120", "--eval-samples", "16", "--text-only-fraction", "0.6", "--seed", "1"]


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(dir)` once per test session, shared by pytest-xdist's workers (the first to take the lock builds, the
    others wait for it): each worker building its own copy cost the two cores a minute. Users only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    out, built = root / name, root / f"{name}.built"
    with FileLock(f"{out}.lock"):
        if not built.exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed in another worker
            out.mkdir()
            build(out)
            built.touch()
    return out


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits data set, prepared once per session (via the CLI entry point)."""
    from data_prep.cli import main

    def prep(out: Path) -> None:
        assert main(["digits", "--out", str(out), "--maxcount", str(DIGITS_MAXCOUNT),
                     "--vision-steps", str(VISION_STEPS), "--test-samples", str(TEST_SAMPLES)]) == 0

    return built_once(tmp_path_factory, "digits", prep)


@pytest.fixture(scope="session")
def hires_digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`prep digits --hires` (the anyres task), prepared once per session, its ViT pretrained for a few steps only
    (enough for `bench accuracy --hires` to run, not to read digits)."""
    from data_prep.cli import main

    return built_once(tmp_path_factory, "digits_hires",
                      lambda out: _prep(main, ["digits", "--hires", "--out", str(out), "--vision-steps", "3",
                                                "--test-samples", str(TEST_SAMPLES)]))


@pytest.fixture(scope="session")
def mix_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LLaVA-mix-shaped set (`megavictor prep mix`: text-only, 1-3 images, aspect 1:3..3:1, multi-turn; splits
    train 400 / val 64 / test 64), prepared once per session through `prep llava` (via the CLI entry point)."""
    from data_prep.cli import main

    return built_once(tmp_path_factory, "mix", lambda out: _prep(main, ["mix", "--out", str(out)]))


@pytest.fixture(scope="session")
def text_heavy_mix_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller, text-heavy mix: 60% text-only conversations (train 120 / val 16 / test 16)."""
    from data_prep.cli import main

    return built_once(tmp_path_factory, "mix_text_heavy",
                      lambda out: _prep(main, [*TEXT_HEAVY_MIX, "--out", str(out)]))


def _prep(main: Callable[[list[str]], int], argv: list[str]) -> None:
    assert main(argv) == 0


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

    def train(run_dir: Path) -> None:
        summary = run(train_cmd(1, digits_data, run_dir, "train.save_interval=5"))
        (run_dir.parent / "tp1pp1.summary.json").write_text(json.dumps(summary))

    run_dir = built_once(tmp_path_factory, "tp1pp1", train)
    return run_dir, json.loads((run_dir.parent / "tp1pp1.summary.json").read_text())


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Paths]:
    """The running two-node test cluster (tests/slurm_cluster.py; .ci/run starts it), or one started for this session
    and stopped at its end. Errors, never skips, when SLURM cannot start: CI must not pass without
    the SLURM tests."""
    from tests.slurm_cluster import session

    with session(nodes=2) as paths:
        yield paths


# The modules that take longest (each 1.5-9 min of one worker), longest first: xdist hands out whole groups in
# collection order (pytest.ini: --no-loadscope-reorder), so these start first and the suite does not end on one
# worker running a long module while the other idles. Its own default order (most tests first) put the few-but-long
# modules last. The SLURM modules form one group.
LONGEST_FIRST = ("test_train", "test_launch", "test_multinode", "test_serving", "test_parity", "test_gpu_defaults",
                 "test_bench", "test_deepspeed", "test_faults", "test_peers", "test_overlap", "test_hf_cli")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist's `loadgroup` (pytest.ini), a module's tests run on one worker, so its module fixtures are
    built once; the SLURM modules name one group ("slurm"): they share the one test cluster. The longest modules
    (`LONGEST_FIRST`) go first; the others keep their order."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
