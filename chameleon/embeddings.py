"""Example embeddings: the mean of the backbone's input token embeddings, L2-normalised.

The paper embeds every example by averaging the LM's input token embeddings (GPT-2's
`wte`, no positions). The authors' code averages over all max_length positions, padding
included; the corrected protocol averages over real tokens only. Which one is used is
just the mask the caller passes:

    mask = embedding_mask(batch["attention_mask"], cfg.protocol)
    emb = mean_embeddings(model, batch["input_ids"], mask)   # (N, d), unit rows
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chameleon.regimes import PROTOCOLS, lookup


def embedding_mask(attention_mask: torch.Tensor, protocol: str) -> torch.Tensor:
    """The positions that count in an example's mean embedding.

    Args:
        attention_mask: (N, L) tensor, 1 on real tokens and 0 on padding.
        protocol: "authors" counts every position, padding included (as the authors' code
            does); "causal" counts real tokens only.
    """
    if lookup(PROTOCOLS, protocol, "protocol").embeds_padding:
        return torch.ones_like(attention_mask)
    return attention_mask


def _position_table(model: torch.nn.Module) -> torch.Tensor:
    """The learned absolute position embeddings (GPT-2's `transformer.wpe`), (n_positions, d)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    wpe = getattr(base, "wpe", None)
    if not isinstance(wpe, torch.nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no learned position embeddings (Llama-style models such as "
            "SmolLM2 encode positions with rotary embeddings inside attention); use positions=False")
    return wpe.weight


@torch.no_grad()
def mean_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                    positions: bool = False, batch_size: int = 4096) -> torch.Tensor:
    """Mean input embedding of each example over the positions where mask == 1, L2-normalised.

    Args:
        model: a Hugging Face causal LM; its `get_input_embeddings()` table is averaged.
        input_ids: (N, L) LongTensor of token ids.
        mask: (N, L) tensor, 1 where a position counts (see `embedding_mask`).
        positions: also add the learned position embedding of each position before
            averaging (GPT-2's `wpe`); ValueError for backbones without one.
        batch_size: examples per chunk; bounds the memory of the gather.

    Returns:
        (N, d) float32 tensor on the CPU with unit-norm rows (all-zero rows for empty masks).
    """
    wte = model.get_input_embeddings().weight
    wte = wte if wte.dtype == torch.float32 else wte.float()  # half-precision sums lose ~3 digits
    wpe = _position_table(model).to(wte) if positions else None
    if wpe is not None and input_ids.shape[1] > wpe.shape[0]:
        raise ValueError(f"sequences of {input_ids.shape[1]} tokens exceed the {wpe.shape[0]} learned positions")
    out = []
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size].to(wte.device)
        m = mask[start:start + batch_size].to(wte)
        # embedding_bag sums the weighted rows without materialising the (n, L, d) gather
        total = F.embedding_bag(ids, wte, mode="sum", per_sample_weights=m)
        if wpe is not None:
            total = total + m @ wpe[:ids.shape[1]]  # sum of position rows at the counted positions
        mean = total / m.sum(1, keepdim=True).clamp(min=1)
        out.append(F.normalize(mean, dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, wte.shape[1])
