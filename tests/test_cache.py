"""The row cache (cache.cached_rows / RowFile): written in chunks, read by rows, the same tensors as in memory."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from chameleon.cache import cache_path, cached_rows
from chameleon.adapters.model import build
from chameleon.prepare import prepare, trimmed
from chameleon.training import scored_rows

import conftest


def test_rows_written_in_chunks_read_back_as_the_tensor_would_give_them(tmp_path):
    torch.manual_seed(0)
    full = torch.randn(1000, 24)
    chunks = lambda: (full[a:a + 37] for a in range(0, 1000, 37))  # noqa: E731  (the last chunk is short)
    rows = cached_rows({"n": 1000}, tmp_path / "hidden", chunks, full.shape)
    assert torch.equal(load_file(cache_path({"n": 1000}, tmp_path / "hidden"))["hidden"], full)  # a safetensors file
    index = torch.tensor([5, 6, 7, 999, 0, 1, 500, 3, 4, 5])  # runs of consecutive rows, out of order, repeated
    assert torch.equal(rows[index], full[index]) and rows[torch.tensor([], dtype=torch.long)].shape == (0, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read back, not rebuilt
        again = cached_rows({"n": 1000}, tmp_path / "hidden", lambda: pytest.fail("recomputed"), full.shape)
    assert torch.equal(again[index], full[index])
    with pytest.warns(UserWarning, match=r"holds shape \(1000, 24\), expected \(1000, 25\); rebuilding it"):
        cached_rows({"n": 1000}, tmp_path / "hidden", lambda: [torch.zeros(1000, 25)], (1000, 25))
    with pytest.raises(ValueError, match="the chunks held 999 rows, the shape says 1000: the cache was not written"):
        cached_rows({"n": 999}, tmp_path / "hidden", lambda: [full[:999]], full.shape)
    with pytest.raises(IndexError, match="rows 0..1000 asked of"):
        rows[torch.tensor([0, 1000])]


def test_the_cached_body_states_are_those_the_body_computes_in_memory(tmp_path, gpt2_tiny):
    cfg = conftest.tiny(tmp_path, regime="lora")
    model, tok = gpt2_tiny
    split, _, _ = prepare(cfg, model, tok)
    adapted = build(cfg, model).eval()
    rows = scored_rows(adapted, split, True, cfg.cache_dir, chunk=5)  # 32 examples: chunks of 5, the last of 2
    # a chunk of the cache (the very computation: equal to the bit), and any batch (other shapes, other sums)
    for batch, atol in (([5, 6, 7, 8, 9], 0.0), ([30, 2, 17, 3], 1e-5)):
        ids, attention, target = trimmed(split, batch)
        with torch.inference_mode():
            memory = adapted.hidden(ids, attention)[target != -100]
        torch.testing.assert_close(rows.hidden[rows.index(batch)], memory, rtol=0, atol=atol)
