"""Greedy generation from an adapted model (sampling too, for REINFORCE), with one head per group of prompts.

    outputs = generate(adapted, tokenizer, prompts, cfg, conds, groups)

Decoding is greedy, up to cfg.max_new_tokens new tokens, stopping at EOS, with the body's KV
cache (linear in the output length): `greedy` one prompt at a time, `batched_greedy` many at once
(left-padded, one body forward a step for the batch, token for token what `greedy` gives; a
step reads every weight once, so on a CPU n prompts cost little more than one). Every token goes
through `adapted.body` and the head, so LoRA, block LoRA, SVF experts and ChameleonLLM heads all
decode the way they were trained. A ChameleonLLM head is conditioned as in evaluation: on
the mean conditioning embedding of the example's validation batch (its cluster batch, or
another batch under `shuffled`). With `batch_mean` conditioning that mean includes the
responses of the batch: the paper-style contrast, which sees the targets; `task` and
`task_input` never see a response.

The prompt is the paper's format without the response; a prompt longer than cfg.max_length
tokens keeps its last cfg.max_length tokens (those that end in "### Response:\\n"). Every
prompt token is attended under both protocols (the paper's `input_ids != 0` mask would only
hide token id 0).

The metrics of the generated answers (BLEU, ROUGE-L, METEOR) are in `chameleon.serve.metrics`.
"""
from __future__ import annotations

import torch

from chameleon.config import Config


@torch.no_grad()
def decode(adapted, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           cond: torch.Tensor | None = None, temperature: float = 0.0,
           generator: torch.Generator | None = None) -> list[int]:
    """Continuation of one prompt: the new token ids, EOS excluded. Fewer than max_new_tokens ids
    means that EOS was chosen.

    Args:
        adapted: a `regimes.Adapted` (any regime).
        prompt_ids: (T,) token ids of the prompt.
        max_new_tokens: at most this many new tokens.
        eos_id: stop when this token is chosen (None: never stop early).
        cond: (d,) conditioning vector of a ChameleonLLM head; ignored otherwise.
        temperature: 0 decodes greedily; above 0 each token is sampled from softmax(logits / temperature).
        generator: a CPU torch.Generator for the sampling.
    """
    dev = next(adapted.parameters()).device
    ids, past, new = prompt_ids.view(1, -1).to(dev), None, []
    for _ in range(max_new_tokens):
        out = adapted.body(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        hidden = out.last_hidden_state[:, -1]  # (1, d)
        logits = adapted.logits(hidden, None if cond is None else cond.to(dev, hidden.dtype))
        if temperature > 0:  # drawn on the CPU, so that one seed gives the same answers on every device
            probs = (logits.float() / temperature).softmax(-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).view(1).to(dev)
        else:
            token = logits.argmax(-1)
        if eos_id is not None and token.item() == eos_id:
            break
        new.append(token.item())
        ids = token.view(1, 1)
    return new


def greedy(adapted, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           cond: torch.Tensor | None = None) -> list[int]:
    """Greedy continuation of one prompt: `decode` at temperature 0."""
    return decode(adapted, prompt_ids, max_new_tokens, eos_id, cond)


def generate(adapted, tokenizer, prompts: list[str], cfg: Config, conds: torch.Tensor | None = None,
             groups: list[int] | None = None, selections: list[int] | None = None) -> list[str]:
    """Greedy outputs (decoded, special tokens skipped) of `prompts`, decoded as one batch
    (`batched_greedy`); prompt i's head is its group's: conds[groups[i]] conditions a ChameleonLLM head,
    selections[groups[i]] picks a LoRA expert."""
    adapted.eval()
    tokens = batched_greedy(adapted, tokenize_prompts(tokenizer, prompts, cfg.max_length), cfg.max_new_tokens,
                            tokenizer.eos_token_id, tokenizer.pad_token_id, conds, groups, selections)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt, its last max_length tokens (those that end a long prompt)."""
    ids = [tokenizer(p)["input_ids"][-max_length:] for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) has no tokens; give it some text")
    return ids


class GroupedHead:
    """The head's logits for a batch whose rows belong to groups: one low-rank update per group.

    For a ChameleonLLM head the hypernetwork runs once, on the (G, d) group vectors; LoRA experts give
    each group's selected expert (`Adapted.group_adapters`): A (G, r, d_in) and B (G, d_out, r). Each
    call then adds scaling * (h @ A[g].T) @ B[g].T to the base logits of group g's rows: in place on a
    contiguous segment (`batched_greedy` sorts its rows by group), gathered and put back otherwise (rows in
    a caller's order, `hf.HFAdapted`); the same addmm either way. Other heads are the same for every group
    and are called as they are.
    """

    def __init__(self, adapted, conds: torch.Tensor | None, selections: list[int] | None, n_groups: int):
        self.adapted = adapted
        if any(x is not None and len(x) != n_groups for x in (conds, selections)):
            raise ValueError(f"{n_groups} groups need one conditioning vector and one selection each")
        self.adapters = adapted.group_adapters(conds, selections)
        self._parts: tuple[torch.Tensor, list] | None = None  # (groups, their rows): the same tensor every step

    def __call__(self, hidden: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(n, d_in) hidden states and the (n,) group of each row -> (n, vocab) logits."""
        if self.adapters is None:
            return self.adapted.logits(hidden)
        A, B, scaling = self.adapters
        out = self.adapted.head.base(hidden)
        for g, rows in self.partition(groups):  # as LoRA.forward with group g's A and B, on its rows
            low = hidden[rows] @ A[g].T * scaling
            if isinstance(rows, slice):
                out[rows].addmm_(low, B[g].T)
            else:
                out[rows] = torch.addmm(out[rows], low, B[g].T)
        return out

    def partition(self, groups: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
        """(group, its rows) for each group present: a slice where the rows are contiguous (updated in place),
        else their indices. Computed once per groups tensor."""
        if self._parts is None or self._parts[0] is not groups:
            parts = []
            for g in groups.unique().tolist():
                rows = (groups == g).nonzero().view(-1)
                start, end = rows[0].item(), rows[-1].item() + 1
                parts.append((g, slice(start, end) if end - start == len(rows) else rows))
            self._parts = (groups, parts)
        return self._parts[1]


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (n, longest): every row's last prompt token in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def batched_greedy(adapted, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                   pad_id: int, conds: torch.Tensor | None = None, groups: list[int] | None = None,
                   selections: list[int] | None = None) -> list[list[int]]:
    """Greedy continuations of many prompts at once: the new token ids of each, EOS excluded.

    Token for token what `generation.greedy` gives one prompt at a time with cond=conds[groups[i]].

    Args:
        adapted: a `regimes.Adapted` (any regime), in eval mode.
        prompts: token ids of each prompt (at least one token each).
        max_new_tokens: at most this many new tokens per prompt.
        eos_id: a row stops when it chooses this token (None: never early).
        pad_id: token fed to padding positions and to finished rows (never attended).
        conds: (G, d) conditioning vector of each group; needed by a ChameleonLLM head only.
        groups: group (0..G-1) of each prompt; None puts every prompt in group 0.
        selections: the expert of each group, for LoRA experts (None: the one routed last, for every group).
    """
    n = len(prompts)
    if n == 0 or max_new_tokens < 1:
        return [[] for _ in range(n)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    groups = [0] * n if groups is None else list(groups)
    dev = next(adapted.parameters()).device
    order = sorted(range(n), key=lambda i: groups[i])  # stable: each group becomes one contiguous segment
    head = GroupedHead(adapted, conds, selections, max(groups) + 1)
    rows_groups = torch.tensor([groups[i] for i in order], device=dev)
    ids, mask = left_padded([prompts[i] for i in order], pad_id, dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens count 0, 1, 2, ... as without padding
    past = None
    new = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    ones = torch.ones((n, 1), dtype=torch.long, device=dev)
    steps = 0
    for t in range(max_new_tokens):
        out = adapted.body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = head(out.last_hidden_state[:, -1], rows_groups).argmax(-1)
        token = token.masked_fill(done, pad_id)
        new[:, t] = token
        steps = t + 1
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):  # one host sync per step, as Hugging Face's generate
                break
        ids, positions, mask = token[:, None], positions[:, -1:] + 1, torch.cat([mask, ones], 1)
    rows = new[:, :steps].tolist()
    result: list[list[int]] = [[] for _ in range(n)]
    for row, i in enumerate(order):
        result[i] = until_eos(rows[row], eos_id)
    return result


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS (all of them when eos_id is None)."""
    return tokens[:tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens
