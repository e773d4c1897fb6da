"""A run as a Hugging Face model, so that `generate` samples, stops at strings and streams with the run's head.

    model, inputs = adapter.hf_model(["The history of Rome", "Photosynthesis is"], group="route")
    out = model.generate(**inputs, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=32)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]

`HFAdapted` is a `PreTrainedModel` (with `GenerationMixin`) around the run's `Adapted`: its forward runs the
adapted body (block LoRA, a single SVF expert) and the run's head. A grouped head (ChameleonLLM, LoRA
experts) holds the (A, B) of each group of this batch, computed once (`generation.GroupedHead`), and
`inputs["groups"]` gives each row's group: an input tensor, so `generate` expands it with the rows it
repeats (num_return_sequences, beams) and each copy keeps its prompt's adapter. SVF experts change the body:
one model holds one expert, so a batch whose groups use several is refused (`Adapter.generate` decodes it
group by group).
"""
from __future__ import annotations

import copy

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from chameleon.serve.decoding import GroupedHead, left_padded


class HFAdapted(PreTrainedModel, GenerationMixin):
    """The adapted body and the run's (grouped) head behind Hugging Face's causal-LM interface."""
    # attention runs inside the wrapped body, which was loaded with its own implementation: accept any here
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, adapted, conds: torch.Tensor | None, selections: list | None, n_groups: int, tokenizer):
        if adapted.body_per_group:
            chosen = set(selections or [])
            if len(chosen) != 1:
                raise ValueError(f"{adapted.experts.cfg.regime} changes the body per expert and this batch's groups use "
                                 f"{len(chosen)} experts: one Hugging Face model holds one body; use "
                                 "Adapter.generate, which decodes such a batch group by group")
            adapted.route_to(chosen.pop())
            selections = None
        super().__init__(copy.deepcopy(adapted.model.config))
        self.adapted = adapted
        self.head = GroupedHead(adapted, conds, selections, n_groups)
        self.generation_config = copy.deepcopy(adapted.model.generation_config)
        self.generation_config.pad_token_id = tokenizer.pad_token_id
        self.generation_config.eos_token_id = tokenizer.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                groups: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """As a causal LM's forward; `groups` (batch,) is each row's group (None: all in group 0)."""
        out = self.adapted.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        n, t, d = hidden.shape
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long, device=hidden.device)
        rows = groups if t == 1 else groups.repeat_interleave(t)  # decoding steps pass the same tensor each time
        logits = self.head(hidden.reshape(n * t, d), rows).view(n, t, -1)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


def hf_inputs(prompts: list[list[int]], groups: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """generate's inputs for token-id prompts: left-padded ids and mask (as `batched_greedy` pads) and groups."""
    ids, mask = left_padded(prompts, pad_id, device)
    return {"input_ids": ids, "attention_mask": mask, "groups": torch.tensor(groups, device=device)}
