"""Hugging Face `generate` on a run (chameleon.serve.hf): greedy equals the kit's batched greedy token for token, rows
repeated by generate keep their group's adapter, and Adapter.generate passes sampling arguments through."""
from types import SimpleNamespace

import pytest
from transformers.generation.streamers import BaseStreamer

from chameleon.serve.decoding import until_eos
from chameleon.serve.hf import HFAdapted
from test_serving import PROMPTS, direct_adapter  # noisy gpt2-tiny adapters: answers vary token to token


def new_tokens(out, inputs, eos):
    return [until_eos(t, eos) for t in out[:, inputs["input_ids"].shape[1]:].tolist()]


def test_greedy_generate_equals_the_kits_batched_greedy():
    """(LoRA and SVF experts go through Hugging Face's generate in test_experts.)"""
    adapter = direct_adapter("chameleon")
    eos = adapter.tokenizer.eos_token_id
    kit = adapter.generate(PROMPTS, max_new_tokens=8, group="kmeans", n_groups=3)
    assert len({r.group for r in kit}) == 3 and [r.group for r in kit] != sorted(r.group for r in kit)
    model, inputs = adapter.hf_model(PROMPTS, group="kmeans", n_groups=3)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert new_tokens(out, inputs, eos) == [r.tokens for r in kit]
    # rows that generate repeats keep their prompt's adapter: top_k=1 sampling is greedy, twice per prompt
    twice = model.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=8)
    assert new_tokens(twice, inputs, eos) == [r.tokens for r in kit for _ in range(2)]
    assert model.generate(**inputs, num_beams=2, max_new_tokens=4).shape[0] == len(PROMPTS)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")


def test_adapter_generate_samples_stops_and_streams():
    adapter = direct_adapter("chameleon")
    greedy = adapter.generate(PROMPTS, max_new_tokens=8, group="route")
    sampled = adapter.generate(PROMPTS, max_new_tokens=8, group="route", do_sample=True, temperature=1.5, top_p=0.9)
    assert [r.tokens for r in sampled] != [r.tokens for r in greedy]
    assert [r.group for r in sampled] == [r.group for r in greedy]
    # a stop string cuts the answer right after it
    full = greedy[0]
    stop = adapter.tokenizer.decode(full.tokens[2:4])
    cut = adapter.generate(PROMPTS, max_new_tokens=8, group="route", do_sample=False, stop_strings=[stop])[0]
    assert stop in adapter.tokenizer.decode(cut.tokens) and full.tokens[:len(cut.tokens)] == cut.tokens
    assert len(cut.tokens) <= 4 and cut.stopped
    streamer = Collect()  # Hugging Face streams one prompt at a time
    one = adapter.generate(PROMPTS[:1], max_new_tokens=5, do_sample=False, streamer=streamer)[0]
    assert streamer.chunks[-1] == "end" and [c[0] for c in streamer.chunks[1:-1]] == one.tokens


def test_what_the_wrapper_cannot_carry_is_refused():
    adapter = direct_adapter("chameleon")
    with pytest.raises(ValueError, match="num_return_sequences > 1 call"):
        adapter.generate(PROMPTS, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        adapter.generate(PROMPTS, max_new_tokens=-3)
    experts = SimpleNamespace(experts=SimpleNamespace(cfg=SimpleNamespace(regime="svf_experts")), body_per_group=True)
    with pytest.raises(ValueError, match="use Adapter.generate"):
        HFAdapted(experts, None, [0, 2], 2, adapter.tokenizer)
