"""Session fixtures shared by the test modules: the digits data set and the tiny HF sources."""

from __future__ import annotations

from pathlib import Path

import pytest

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
