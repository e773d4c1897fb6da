"""The adapted model: a frozen backbone with the adapters of one regime (see `chameleon.regimes`).

    adapted = build(cfg, model)        # cfg.regime, initialised from cfg.seed
    logits = adapted.logits(adapted.hidden(ids, attention), cond)
"""
from __future__ import annotations

import torch
from torch import nn

from chameleon import objectives
from chameleon.config import Config
from chameleon.fused_loss import CHUNK, fused_loss_sum
from chameleon.hypernetwork import ChameleonHead, HyperNetwork
from chameleon.lora import FLAVOUR, LoRA, add_lora, dims, freeze, trainable_parameters
from chameleon.regimes import REGIMES


class Adapted(nn.Module):
    """A frozen causal LM whose head is replaced by `head`, optionally with LoRA in its blocks.

    The body gives the final hidden states; the head turns the scored ones into logits, so a
    head-only regime can run on hidden states computed once (see training.scored_rows).
    """

    def __init__(self, model: nn.Module, head: nn.Module, blocks_adapted: bool):
        super().__init__()
        self.model, self.head, self.blocks_adapted = model, head, blocks_adapted
        self.conditioned = isinstance(head, ChameleonHead)

    def train(self, mode: bool = True) -> "Adapted":
        super().train(mode)
        if not self.blocks_adapted:
            self.model.eval()  # a frozen, unadapted body: no dropout noise, as in the cached path
        return self

    def hidden(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(B, L, d) final hidden states (after the last layer norm)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(hidden, cond) if self.conditioned else self.head(hidden)

    def loss_sum(self, hidden: torch.Tensor, target: torch.Tensor, cond: torch.Tensor | None = None,
                 chunk: int = CHUNK) -> torch.Tensor:
        """Summed cross-entropy of the head's logits over rows whose target is not -100, equal to
        objectives.loss_sum(self.logits(hidden, cond), target) but chunk by chunk (chameleon.fused_loss):
        the (rows x vocab) logits are never formed. Per-example adapters (cond 2-D) take the plain path."""
        base = getattr(self.head, "base", self.head)
        if (self.conditioned and cond.dim() != 1) or not isinstance(base, nn.Linear) or base.weight.requires_grad:
            logits = self.logits(hidden, cond)
            return objectives.loss_sum(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        low, B = (None, None) if self.head is base else \
            self.head.factors(hidden, cond) if self.conditioned else self.head.factors(hidden)
        return fused_loss_sum(hidden, base.weight, target, base.bias, low, B, chunk)

    def trainable(self) -> int:
        """Trainable parameters; for `unadapted` the backbone's total, as the paper's table reports."""
        n = trainable_parameters(self)
        return n or sum(p.numel() for p in self.model.parameters())


def matched_rank(cfg: Config, model: nn.Module) -> int:
    """Head-LoRA rank whose parameter count is nearest the `chameleon` hypernetwork's (counted on the
    module itself, built on the meta device: no memory, and never out of date with its architecture)."""
    d_in, d_out = dims(model.get_output_embeddings())
    with torch.device("meta"):
        hyper = HyperNetwork(model.get_input_embeddings().embedding_dim, d_in, d_out, cfg.rank, cfg.hyper_hidden)
    return max(1, round(trainable_parameters(hyper) / (d_in + d_out)))


def build(cfg: Config, model: nn.Module) -> Adapted:
    """Freeze `model` and attach the adapters of cfg.regime (a row of `regimes.REGIMES`), initialised from cfg.seed.

    The paper protocol uses the authors' LoRA flavour (A, B ~ N(0, 0.01^2), scale alpha);
    the causal protocol uses ordinary LoRA (B = 0, scale alpha / r).
    """
    flavour, regime = FLAVOUR[cfg.protocol], REGIMES[cfg.regime]
    freeze(model)
    torch.manual_seed(cfg.seed)  # the hypernetwork draws from the global RNG
    if regime.blocks == "lora":
        add_lora(model, "blocks", cfg.rank, cfg.alpha, flavour, generator=cfg.seed + 1)
    base = model.get_output_embeddings()
    if regime.head == "base":
        head = base
    elif regime.head == "lora":
        rank = matched_rank(cfg, model) if regime.matched_rank else cfg.rank
        head = LoRA(base, rank, cfg.alpha, flavour, generator=cfg.seed)
    else:
        head = ChameleonHead(base, model.get_input_embeddings().embedding_dim, cfg.rank, cfg.alpha, flavour,
                             cfg.hyper_hidden, cfg.hyper_dropout)
    return Adapted(model, head, blocks_adapted=not regime.frozen_body)
