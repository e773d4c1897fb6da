"""Backbones: GPT-2's exact tokenizer, GPT-2's architecture, and the embedded SmolLM2 (real files, no mocks)."""
import hashlib
import math
import time

import pytest
import torch

from chameleon.assets import ASSETS
from chameleon.backbones import gpt2_tokenizer, load_backbone
from chameleon.config import ROOT

PROSE = [
    "The river rises in the northern hills and flows south for about two hundred kilometres before it "
    "reaches the sea. Several small towns grew up along its banks during the Middle Ages, when the river "
    "was the main route for trade in wool, grain and timber.",
    "The city is the capital of the province and its largest urban area. It has a university, a cathedral "
    "and a busy port. Its population grew quickly in the nineteenth century, when new railways linked it "
    "to the rest of the country.",
    "The species is found in forests across much of Europe and western Asia. It feeds mainly on insects "
    "and seeds, and it usually builds its nest in a hole in a tree. Adults are about twenty centimetres "
    "long and have brown feathers with white spots.",
]


# --- GPT-2's exact tokenizer (from whisper's gpt2.tiktoken) ---

@pytest.fixture(scope="module")
def gpt2_tok():
    return gpt2_tokenizer()


def test_gpt2_tokenizer_matches_gpt2(gpt2_tok):
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]
    assert gpt2_tok.eos_token_id == 50256
    assert len(gpt2_tok) == 50257


@pytest.mark.parametrize("text", [
    "Hello world",
    "Café naïve — 日本語 and emoji 😀\n\nA second paragraph,\twith a tab.\n",
    "  leading spaces, trailing spaces  \n\n\n",
    "It's the 3rd time we've said \"ok\" in 2024: 12.5% of 80 = 10!",
])
def test_gpt2_tokenizer_round_trips(gpt2_tok, text):
    assert gpt2_tok.decode(gpt2_tok.encode(text)) == text


@pytest.mark.parametrize("name", ["gpt2-tiny", "smollm2"])
def test_each_load_gets_a_tokenizer_whose_settings_are_its_own(name):
    a, b = (load_backbone(name)[1] for _ in range(2))
    a.padding_side, a.pad_token = "left", "!"
    assert (b.padding_side, b.pad_token) == ("right", b.eos_token)
    pad_a, pad_b, word = a.convert_tokens_to_ids("!"), b.eos_token_id, b("Hello")["input_ids"]
    assert a("Hello", padding="max_length", max_length=3)["input_ids"] == [pad_a] * (3 - len(word)) + word
    assert b("Hello", padding="max_length", max_length=3)["input_ids"] == word + [pad_b] * (3 - len(word))


# --- GPT-2's architecture, randomly initialised ---

@pytest.fixture(scope="module")
def gpt2_arch():
    return load_backbone("gpt2-arch", seed=0)


def test_gpt2_arch_parameter_count_and_tied_head(gpt2_arch):
    model, tok = gpt2_arch
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # the paper's "unadapted" row
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tok.pad_token_id == 50256 and tok.padding_side == "right"
    assert not model.training and model.dtype == torch.float32


def test_gpt2_arch_weights_follow_the_seed(gpt2_arch):
    weight = gpt2_arch[0].transformer.h[0].attn.c_attn.weight
    same, _ = load_backbone("gpt2-arch", seed=0)
    assert torch.equal(weight, same.transformer.h[0].attn.c_attn.weight)
    del same
    other, _ = load_backbone("gpt2-arch", seed=1)
    assert not torch.equal(weight, other.transformer.h[0].attn.c_attn.weight)


# --- the embedded SmolLM2-135M-Instruct (the real GGUF, converted once to a cached copy) ---

@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2")


def _cached_copy():
    gguf = ASSETS["smollm2"].require()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    return ROOT / "data" / "cache" / "models" / f"smollm2-{digest}"


def test_smollm2_architecture(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49_152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token_id is not None and tok.padding_side == "right"


def test_smollm2_cached_copy_reloads_identically(smollm2):
    model, tok = smollm2
    assert (_cached_copy() / "model.safetensors").is_file()
    again, _ = load_backbone("smollm2")
    ids = tok(PROSE[0], return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_smollm2_perplexity_on_english_prose(smollm2):
    model, tok = smollm2
    enc = tok("\n\n".join(PROSE), return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert math.exp(loss.item()) < 60  # ~18 measured; a broken conversion gives thousands


# --- bad input ---

def test_unknown_backbone_names_the_offline_default(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="smollm2"):
        load_backbone("gtp2")
    assert time.perf_counter() - start < 5  # one reachability probe, no download retries


def test_path_without_a_model_names_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError) as err:
        load_backbone(str(tmp_path))
    assert str(tmp_path) in str(err.value)
