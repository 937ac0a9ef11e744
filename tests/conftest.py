"""Fixtures shared by several test modules (pytest finds them here; no test
module imports another). Shared non-fixture helpers live in plain modules:
helpers.py, hf_models.py, engine_models.py, forward_models.py, format_models.py.

Markers (registered in pyproject.toml; README's `pytest -q tests` runs all):
slow, torch, server, ray, native."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{shift: Tiny} for shift in (True, False): the sharpened tiny models of
    engine_models.py converted to .bin, with transformers' model as the oracle."""
    from bitdlm.convert import convert
    from bitdlm.format import ModelFile
    from engine_models import BS, SBS, Tiny, sharpened_checkpoint
    from hf_models import MASK_ID, load_reference_model

    out = {}
    for shift in (True, False):
        tmp = tmp_path_factory.mktemp(f"shift{int(shift)}")
        hf_dir = sharpened_checkpoint(tmp, shift, seed=1 if shift else 2)
        path = convert(hf_dir, tmp / "model.bin", force=True, progress=False)
        meta = ModelFile.open(path).meta
        d = meta["diffusion"]
        assert (d["block_size"], d["small_block_size"], d["shift_logits"]) == (BS, SBS, shift)
        assert meta["mask_token_id"] == MASK_ID
        out[shift] = Tiny(load_reference_model(hf_dir), meta, path)
    return out
