import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from chameleon.cache import cached
from chameleon.embeddings import embedding_mask, mean_embeddings


def slow_mean_embeddings(model, input_ids, mask, positions=False):
    """The reference: one example at a time, mean of the counted rows, then normalise."""
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    out = []
    for ids, m in zip(input_ids.tolist(), mask.tolist()):
        rows = [wte[t] + (wpe[p] if positions else 0) for p, (t, keep) in enumerate(zip(ids, m)) if keep]
        mean = torch.stack(rows).mean(0)
        out.append(mean / mean.norm())
    return torch.stack(out)


@pytest.fixture
def batch():
    torch.manual_seed(1)
    lengths = torch.tensor([1, 5, 12, 16, 9, 3])
    attention_mask = (torch.arange(16) < lengths[:, None]).long()
    input_ids = torch.randint(0, 50257, (6, 16)).masked_fill(attention_mask == 0, 50256)  # right-padded with EOS
    return input_ids, attention_mask


@pytest.mark.parametrize("protocol", ["authors", "causal"])
@pytest.mark.parametrize("positions", [False, True])
def test_matches_slow_loop(tiny_gpt2, batch, protocol, positions):
    input_ids, attention_mask = batch
    mask = embedding_mask(attention_mask, protocol)
    with torch.no_grad():
        expected = slow_mean_embeddings(tiny_gpt2, input_ids, mask, positions)
    got = mean_embeddings(tiny_gpt2, input_ids, mask, positions=positions, batch_size=4)  # several chunks
    assert got.shape == (6, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6), atol=1e-6, rtol=0)


def test_padding_matters_only_under_paper_mask(tiny_gpt2, batch):
    input_ids, attention_mask = batch
    longer_ids = torch.cat([input_ids, torch.full((6, 8), 50256)], 1)  # same text, 8 more pad tokens
    longer_mask = torch.cat([attention_mask, torch.zeros(6, 8, dtype=torch.long)], 1)
    for protocol, same in (("authors", False), ("causal", True)):
        short = mean_embeddings(tiny_gpt2, input_ids, embedding_mask(attention_mask, protocol))
        long = mean_embeddings(tiny_gpt2, longer_ids, embedding_mask(longer_mask, protocol))
        assert torch.allclose(short, long, atol=1e-6) == same, protocol


def test_positions_need_learned_position_embeddings():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ids, mask = torch.randint(0, 128, (2, 8)), torch.ones(2, 8)
    assert mean_embeddings(llama, ids, mask).shape == (2, 16)
    with pytest.raises(ValueError, match="rotary"):
        mean_embeddings(llama, ids, mask, positions=True)


def test_bad_protocol():
    with pytest.raises(ValueError, match="authors"):
        embedding_mask(torch.ones(1, 2), "other")


def test_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3)

    key = dict(backbone="gpt2-tiny", corpus="wiki", split="train", max_length=16, protocol="causal",
               kind="token", n=5, seed=0)
    first = cached(key, tmp_path / "embeddings", compute)
    second = cached(dict(reversed(key.items())), tmp_path / "embeddings", compute)  # key order is irrelevant
    assert len(calls) == 1 and torch.equal(first, second)

    cached({**key, "kind": "token+position"}, tmp_path / "embeddings", compute)
    assert len(calls) == 2
    tensors = sorted((tmp_path / "embeddings").glob("*.safetensors"))
    keys = sorted((tmp_path / "embeddings").glob("*.json"))
    assert len(tensors) == 2 and [p.stem for p in tensors] == [p.stem for p in keys]
    assert len(list((tmp_path / "embeddings").iterdir())) == 4  # no temporary files left behind
    stored = {json.loads(p.read_text())["kind"]: p.stem for p in keys}
    torch.testing.assert_close(load_file(tmp_path / "embeddings" / f"{stored['token']}.safetensors")["embeddings"],
                               first)
