import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from chameleon.adapters.lora import LoRA, add_lora, freeze, scaling, trainable_parameters


def base_parameters(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".A", ".B")))


def test_head_lora_counts_match_the_paper_and_keep_the_tie():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    freeze(model)
    assert add_lora(model, "head", rank=4, alpha=1.0, flavour="authors", generator=0) == ["lm_head"]
    assert trainable_parameters(model) == 204_100 == 4 * (768 + 50_257)
    assert model.lm_head.base.weight is model.transformer.wte.weight  # same Parameter: not untied, not cloned
    assert base_parameters(model) == 124_439_808


def test_the_paper_flavour_scales_by_alpha_and_standard_by_alpha_over_rank():
    torch.manual_seed(0)
    layer, x = nn.Linear(6, 5), torch.randn(3, 6)
    updates = {}
    for flavour in ("authors", "standard"):
        lora = LoRA(layer, rank=4, alpha=2.0, flavour=flavour, generator=0)
        with torch.no_grad():
            lora.A.copy_(torch.ones(4, 6))
            lora.B.copy_(torch.ones(5, 4))
            updates[flavour] = lora(x) - layer(x)
    assert torch.allclose(updates["authors"], 2.0 * x.sum(1, keepdim=True) * 4 * torch.ones(3, 5), rtol=1e-5)
    assert torch.allclose(updates["authors"], 4 * updates["standard"], rtol=1e-5)  # alpha vs alpha / r, r = 4
    with pytest.raises(ValueError, match="unknown LoRA flavour"):
        scaling("qlora", 1.0, 4)


def test_bad_arguments_raise(tiny_gpt2):
    with pytest.raises(ValueError, match="rank must be >= 1; rank 0 means no adapter: use regime 'unadapted'"):
        add_lora(tiny_gpt2, "head", rank=0, alpha=1.0, flavour="authors")
    with pytest.raises(ValueError, match="unknown LoRA flavour"):
        add_lora(tiny_gpt2, "head", rank=4, alpha=1.0, flavour="qlora")
    with pytest.raises(ValueError, match="unknown LoRA placement"):
        add_lora(tiny_gpt2, "embeddings", rank=4, alpha=1.0, flavour="authors")
    assert isinstance(tiny_gpt2.lm_head, nn.Linear)  # nothing was changed by the failed calls


def test_standard_starts_at_the_base_model_and_paper_does_not(tiny_gpt2):
    ids = torch.randint(0, 50_257, (2, 8))
    with torch.no_grad():
        base = tiny_gpt2(ids).logits
        for flavour, same in (("standard", True), ("authors", False)):
            model = copy.deepcopy(tiny_gpt2)
            add_lora(model, "head", 4, 1.0, flavour, generator=0)
            add_lora(model, "blocks", 4, 1.0, flavour, generator=1)
            assert torch.equal(model(ids).logits, base) == same


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_the_dense_update(kind):
    torch.manual_seed(0)
    layer = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)  # Conv1D(nf=out, nx=in)
    lora = LoRA(layer, rank=3, alpha=2.0, flavour="standard")
    assert lora.A.shape == (3, 6) and lora.B.shape == (5, 3)
    with torch.no_grad():
        lora.A.normal_(), lora.B.normal_()
    delta = lora.scaling * lora.B @ lora.A  # (out, in)
    W = layer.weight + delta if kind == "linear" else layer.weight + delta.T  # Conv1D's W is (in, out)
    x = torch.randn(2, 4, 6)
    dense = x @ W.T + layer.bias if kind == "linear" else x @ W + layer.bias
    torch.testing.assert_close(lora(x), dense)
    assert not torch.allclose(lora(x), layer(x))


def test_standard_lora_matches_peft_on_gpt2_conv1d(tiny_gpt2):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(tiny_gpt2), config).eval()
    ours = copy.deepcopy(tiny_gpt2)
    for i, block in enumerate(ours.transformer.h):
        block.attn.c_attn = LoRA(block.attn.c_attn, rank=4, alpha=8, flavour="standard", generator=i)
        with torch.no_grad():
            block.attn.c_attn.B.normal_()  # B = 0 at init would hide a wrong B layout
            peft_layer = theirs.base_model.model.transformer.h[i].attn.c_attn
            peft_layer.lora_A["default"].weight.copy_(block.attn.c_attn.A)
            peft_layer.lora_B["default"].weight.copy_(block.attn.c_attn.B)
        assert peft_layer.scaling["default"] == block.attn.c_attn.scaling
    ids = torch.randint(0, 50_257, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits)
        assert not torch.allclose(ours(ids).logits, tiny_gpt2(ids).logits)


def test_same_seed_same_init():
    layer = nn.Linear(16, 8)
    for flavour in ("authors", "standard"):
        a, b, c = (LoRA(layer, 4, 1.0, flavour, generator=s) for s in (0, 0, 1))
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert not torch.equal(a.A, c.A)
    a, b = LoRA(layer, 4, 1.0, "authors", torch.Generator().manual_seed(3)), LoRA(layer, 4, 1.0, "authors", 3)
    assert torch.equal(a.A, b.A)


def test_adapters_follow_the_base_weight_dtype():
    lora = LoRA(nn.Linear(8, 4).double(), 2, 1.0, "authors", generator=0)
    assert lora.A.dtype == lora.B.dtype == torch.float64
    assert torch.equal(lora.A, LoRA(nn.Linear(8, 4), 2, 1.0, "authors", generator=0).A.double())


def test_blocks_lora_wraps_gpt2_conv1d_layers_and_not_the_head(tiny_gpt2):
    add_lora(tiny_gpt2, "head", 4, 1.0, "authors", generator=0)
    names = add_lora(tiny_gpt2, "blocks", 4, 1.0, "authors", generator=0)
    assert names == [f"transformer.h.{i}.{layer}" for i in range(2)
                     for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert isinstance(tiny_gpt2.transformer.h[0].mlp.c_fc, LoRA)
    assert isinstance(tiny_gpt2.lm_head.base, nn.Linear)  # the head's adapter was not wrapped again


def test_blocks_lora_wraps_llama_linear_layers_and_head_keeps_tie():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = freeze(LlamaForCausalLM(config))
    names = add_lora(model, "blocks", 2, 1.0, "standard", generator=0)
    assert names == [f"model.layers.{i}.{layer}" for i in range(2) for layer in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert add_lora(model, "head", 2, 1.0, "standard", generator=0) == ["lm_head"]
    assert model.lm_head.base.weight is model.model.embed_tokens.weight
    assert trainable_parameters(model) == 2 * (32 + 1000) + 2 * sum(
        2 * (32 + out) for out in (32, 16, 16, 32)) + 2 * 3 * 2 * (32 + 64)
    model(torch.randint(0, 1000, (1, 5)))  # the wrapped model still runs


def test_only_adapters_get_gradients_and_adamw_lowers_the_loss(tiny_gpt2):
    freeze(tiny_gpt2)
    add_lora(tiny_gpt2, "head", 4, 1.0, "standard", generator=0)
    add_lora(tiny_gpt2, "blocks", 4, 1.0, "standard", generator=1)
    ids = torch.randint(0, 50_257, (2, 8))
    loss = tiny_gpt2(ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in tiny_gpt2.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith((".A", ".B")) for n in with_grad)
    assert tiny_gpt2.transformer.wte.weight.grad is None
    opt = torch.optim.AdamW([p for p in tiny_gpt2.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    with torch.no_grad():
        assert tiny_gpt2(ids, labels=ids).loss < loss
