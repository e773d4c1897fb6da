"""The two training objectives, as per-position targets (-100 = not scored).

Both protocols are expressed the same way: `targets[i, t]` is the token that the hidden
state at position t of example i must predict, or -100. The loss is the cross-entropy
averaged over scored positions, and perplexity is exp of that token-weighted mean.

- "authors" reproduces the authors' default ("last" mode): only the last position is scored,
  against the token AT that position (not the next one); sequences are right-padded with
  EOS to max_length, so for short texts the target is the pad token; token id 0 is the
  ignore index, and the attention mask is `input_ids != 0`, so padding is attended.
- "causal" is ordinary next-token prediction over every real token: padding is masked out
  of attention and of the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chameleon.regimes import PROTOCOLS, lookup

IGNORE = -100
PAPER_IGNORE_ID = 0  # the authors' ignore_index and attention-mask test: token 0, not the pad token


def attention_mask(input_ids: torch.Tensor, real: torch.Tensor, protocol: str) -> torch.Tensor:
    """What the backbone attends to: `input_ids != 0` (authors) or the real tokens (causal)."""
    return (input_ids != PAPER_IGNORE_ID).long() if lookup(PROTOCOLS, protocol, "protocol").attends_nonzero else real


def targets(input_ids: torch.Tensor, real: torch.Tensor, protocol: str,
            loss_from: torch.Tensor | None = None) -> torch.Tensor:
    """(N, L) targets aligned with the hidden states; -100 where nothing is scored.

    Args:
        input_ids: (N, L) right-padded token ids.
        real: (N, L) 1 on real tokens, 0 on padding (the tokenizer's attention mask).
        protocol: "authors" or "causal".
        loss_from: (N,) first token index that may be a target (e.g. where the response of an
            instruction starts, or after a conditioning prefix); None: from the start.
    """
    row = lookup(PROTOCOLS, protocol, "protocol")
    n, length = input_ids.shape
    out = torch.full_like(input_ids, IGNORE)
    if row.scores_padding:  # the token at the last position itself (target_offset 0), unless it is token 0
        last = input_ids[:, -1]
        out[:, -1] = torch.where(last == PAPER_IGNORE_ID, IGNORE, last)
    else:  # every real token, predicted from the position before it
        out[:, :-1] = torch.where(real[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    if loss_from is not None:  # the target of position t is token t + target_offset
        token = torch.arange(length).expand(n, length) + row.target_offset
        out = torch.where(token >= loss_from[:, None], out, IGNORE)
    return out


def target_tokens(targets: torch.Tensor, protocol: str) -> torch.Tensor:
    """(N, L) bool: the input positions whose token is some position's scored target (position t
    under "authors", t + 1 under "causal"); the `batch_mean_excl` conditioning averages over the rest."""
    scored = targets != IGNORE
    shift = lookup(PROTOCOLS, protocol, "protocol").target_offset
    out = torch.zeros_like(scored)
    out[:, shift:] = scored[:, :scored.shape[1] - shift]
    return out


def loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of scored rows: logits (M, V), target (M,)."""
    return F.cross_entropy(logits.float(), target, reduction="sum")
