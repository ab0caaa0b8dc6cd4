"""`megavictor/hf_model/anyres.py` against transformers' LLaVA-NeXT: tiles per image (`image_size_to_num_patches`),
the fitted resolution (`select_best_resolution`), visual tokens (the processor's `_get_number_of_features`) and the
feature gather (`LlavaNextModel.pack_image_features` on random features), for thousands of image sizes at
LLaVA-NeXT's shape (336-px tiles of 14-px patches) and at test shapes; here (transformers 5.25) and in the clean
venvs of 4.57.6 and 5.19.0 (tests/hf_clean_venvs.py), where the same check runs as a script.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import hf_clean_venvs

ANYRES = Path(__file__).resolve().parents[1] / "megavictor" / "hf_model" / "anyres.py"
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's
TEST_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]

# Runs in this environment and in each clean venv (no megavictor there: anyres.py is loaded from its file).
CHECK = '''
import importlib.util, random, sys
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next import modeling_llava_next as next_model

spec = importlib.util.spec_from_file_location("anyres", sys.argv[1])
anyres = sys.modules["anyres"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(anyres)


class Counter:  # the processor's token count, without a tokenizer or image processor
    num_additional_image_tokens = 1
    _get_number_of_features = LlavaNextProcessor._get_number_of_features
    _get_unpadded_features = LlavaNextProcessor._get_unpadded_features

    def __init__(self, pins, patch):
        self.patch_size = patch
        self.image_processor = type("ImageProcessor", (), {"image_grid_pinpoints": pins})()


def check(tile, patch, pins, sizes, gathers, seed):
    rng = random.Random(seed)
    pinpoints = tuple(tuple(p) for p in pins)
    model = next_model.LlavaNextModel(LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=tile, patch_size=patch, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=64), image_grid_pinpoints=pins))
    counter = Counter(pins, patch)
    shapes = [(rng.randint(1, 4 * tile), rng.randint(1, 4 * tile)) for _ in range(sizes)]
    shapes += [(tile, tile), (1, 5 * tile), (5 * tile, 1), (2 * tile, tile), (tile, 3 * tile)] + [tuple(p) for p in pins]
    for h, w in shapes:
        layout = anyres.anyres_layout(h, w, pinpoints, tile, patch)
        assert anyres.select_best_resolution(h, w, pinpoints) == tuple(hf_best((h, w), pins)), (h, w)
        assert layout.tiles == next_model.image_size_to_num_patches((h, w), pins, tile), (h, w)
        assert layout.tokens == counter._get_number_of_features(h, w, tile, tile) - 1, (h, w)  # "default": no CLS
    assert anyres.max_anyres_tokens(pinpoints, tile, patch) == max(
        counter._get_number_of_features(h, w, tile, tile) - 1 for h, w in shapes)
    for _ in range(gathers):  # several images at once, as a batch holds them
        batch = [shapes[rng.randrange(len(shapes))] for _ in range(rng.randint(1, 3))]
        layouts = [anyres.anyres_layout(h, w, pinpoints, tile, patch) for h, w in batch]
        features = [torch.randn(lay.tiles, lay.side * lay.side, 8) for lay in layouts]
        newline = torch.randn(8)
        packed, lengths = model.pack_image_features(features, torch.tensor(batch), "default", image_newline=newline)
        flat = torch.cat([torch.cat(features).flatten(0, 1), newline[None]])
        assert torch.equal(flat[anyres.feature_index(layouts, flat.shape[0] - 1)], torch.cat(packed)), batch
        assert [lay.tokens for lay in layouts] == lengths.tolist()


sizes, gathers = int(sys.argv[2]), int(sys.argv[3])
check(336, 14, %r, sizes, gathers, 0)
check(32, 8, %r, sizes, gathers, 1)
check(32, 4, %r, sizes, gathers, 2)
print("ok")
''' % (NEXT_PINPOINTS, TEST_PINPOINTS, TEST_PINPOINTS)


def test_anyres_matches_transformers_here(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    run = subprocess.run(["python3", str(script), str(ANYRES), "2000", "200"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("version", [v for v in hf_clean_venvs.TRANSFORMERS if v != "5.25.0"])
def test_anyres_matches_transformers_in_a_clean_venv(version: str, tmp_path: Path) -> None:
    python = hf_clean_venvs.ready(version)
    if python is None:
        pytest.skip(f"no clean venv with transformers {version} under {hf_clean_venvs.cache_dir()}: build it with "
                    "`python -m tests.hf_clean_venvs` (.ci/run does)")
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    run = subprocess.run([str(python), str(script), str(ANYRES), "500", "50"], capture_output=True, text=True,
                         timeout=600, env=hf_clean_venvs.clean_env())
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
