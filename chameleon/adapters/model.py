"""The adapted model: a frozen backbone and the adapter components of one regime (see `chameleon.regimes`).

    adapted = build(cfg, model)           # cfg.regime's components, initialised from cfg.seed
    adapted.bind(train_split, val_split)  # components that depend on the data (the experts' groups)
    adapted.route(split, batch)           # before each batch: the experts pick theirs
    logits = adapted.logits(adapted.hidden(ids, attention), cond)

The head is the frozen LM head, a `LoRA`, a `ChameleonHead` (LoRA written by the hypernetwork) or
`LoRAExperts`; the body is frozen, carries block LoRA (in place), or runs under `SVFExperts`.
Components that depend on the data answer the `Component` calls (adapters.component); `Experts` is the one
mechanism for "one adapter per group of the data, picked per batch", whatever the adapter kind (adapters.experts).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon import objectives
from chameleon.adapters import svf as svf_lib
from chameleon.adapters.component import Component
from chameleon.adapters.experts import Experts, LoRAExperts
from chameleon.adapters.hypernetwork import ChameleonHead, HyperNetwork, Standardized
from chameleon.adapters.lora import LoRA, add_lora, dims, freeze, scaling, trainable_parameters
from chameleon.adapters.svf import SVFExperts
from chameleon.config import Config
from chameleon.fused_loss import CHUNK, fused_loss_sum
from chameleon.regimes import PROTOCOLS, REGIMES


class Adapted(nn.Module):
    """A frozen causal LM whose head is replaced by `head`, optionally with LoRA in its blocks or SVF experts.

    The body gives the final hidden states; the head turns the scored ones into logits, so a
    head-only regime can run on hidden states computed once (see training.scored_rows).
    """

    def __init__(self, model: nn.Module, head: nn.Module, blocks_adapted: bool, svf: SVFExperts | None = None,
                 others: tuple[Component, ...] = ()):
        super().__init__()
        self.model, self.head, self.blocks_adapted, self.svf = model, head, blocks_adapted, svf
        self.others = others  # components that are not modules of their own (Standardized)
        self.conditioned = isinstance(head, ChameleonHead)

    @property
    def components(self) -> list[Component]:
        return [m for m in (self.head, self.svf) if isinstance(m, Component)] + list(self.others)

    @property
    def experts(self) -> Experts | None:
        """The experts component (head or body), if the regime has one."""
        return next((c for c in self.components if isinstance(c, Experts)), None)

    @property
    def body_per_group(self) -> bool:
        """The body differs between groups (SVF experts, K > 1): a batch that mixes groups is decoded group by
        group; every other regime decodes a mixed batch together (the head alone differs per group)."""
        return self.svf is not None and self.svf.k > 1

    def train(self, mode: bool = True) -> "Adapted":
        super().train(mode)
        if not self.blocks_adapted:
            self.model.eval()  # a frozen, unadapted body: no dropout noise, as in the cached path
        return self

    def body(self, **kwargs):
        """The body's forward (`model.base_model`), with the selected SVF expert applied if there is one."""
        return self.model.base_model(**kwargs) if self.svf is None else self.svf.body(self.model, **kwargs)

    def hidden(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(B, L, d) final hidden states (after the last layer norm)."""
        return self.body(input_ids=input_ids, attention_mask=attention).last_hidden_state

    def bind(self, train_split, val_split) -> None:
        for c in self.components:
            c.bind(self, train_split, val_split)

    def route(self, split, batch: list[int]) -> None:
        for c in self.components:
            c.route(self, split, batch)

    def route_to(self, selection) -> None:
        for c in self.components:
            c.route_to(selection)

    def report(self) -> dict:
        return {k: v for c in self.components for k, v in c.report().items()}

    def bound(self) -> dict[str, torch.Tensor]:
        return {k: v for c in self.components for k, v in c.bound().items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for c in self.components:
            c.restore(tensors)

    def unservable(self) -> str:
        return next((why for c in self.components if (why := c.unservable())), "")

    def held_out(self) -> list[int]:
        return sorted(i for c in self.components for i in c.held_out())

    def group_adapters(self, conds: torch.Tensor | None, selections: list[int] | None
                       ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """One head update per group of a decoding batch, (A (G, r, d_in), B (G, d_out, r), scaling): a
        ChameleonHead's for each group's conditioning vector, LoRA experts' for each group's selection;
        None where the head is the same for every group (LoRA experts without selections: the one routed)."""
        if self.conditioned:
            if conds is None:
                raise ValueError("a ChameleonLLM head needs one conditioning vector per group")
            w = self.head.base.weight
            return (*self.head.generate_adapter(conds.to(w.device, w.dtype)), self.head.scaling)
        if isinstance(self.head, LoRAExperts) and selections is not None:
            return (*self.head.generate_adapter(selections), self.head.scaling)
        return None

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(hidden, cond) if self.conditioned else self.head(hidden)

    def line_adapters(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """One head update per line of a batch, as `group_adapters` gives them: the hypernetwork's for each line's
        own vector (cond 2-D: Config.cond_level), or the expert each line was routed to (a per-line dispatch); None
        where the whole batch shares one head."""
        if self.conditioned and cond is not None and cond.dim() == 2:
            return self.group_adapters(cond, None)
        if isinstance(self.head, LoRAExperts) and isinstance(self.head.selection, list):
            return self.group_adapters(None, self.head.selection)
        return None

    def loss_sum(self, hidden: torch.Tensor, target: torch.Tensor, cond: torch.Tensor | None = None,
                 owner: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
        """Summed cross-entropy of the head's logits over rows whose target is not -100, equal to
        objectives.loss_sum(self.logits(hidden, cond), target) but chunk by chunk (chameleon.fused_loss):
        the (rows x vocab) logits are never formed. Per-line adapters (`line_adapters`; owner (rows,): each row's
        line) enter as one block-diagonal LoRA (`segments`)."""
        base = getattr(self.head, "base", self.head)
        lines = self.line_adapters(cond)
        if lines is not None:
            low, B = segments(hidden, owner, *lines)
        elif self.head is base:
            low, B = None, None
        else:
            low, B = self.head.factors(hidden, cond) if self.conditioned else self.head.factors(hidden)
        if not isinstance(base, nn.Linear) or base.weight.requires_grad:
            logits = self.logits(hidden, cond) if lines is None else base(hidden) + low @ B.T
            return objectives.loss_sum(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return fused_loss_sum(hidden, base.weight, target, base.bias, low, B, chunk)

    def row_losses(self, hidden: torch.Tensor, target: torch.Tensor, cond: torch.Tensor | None = None,
                   owner: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
        """(rows,) cross-entropy of every row (evaluation: the logits of one chunk at a time)."""
        lines = self.line_adapters(cond)
        if lines is None:
            return torch.cat([F.cross_entropy(self.logits(h, cond).float(), t, reduction="none")
                              for h, t in zip(hidden.split(chunk), target.split(chunk))])
        low, B = segments(hidden, owner, *lines)
        base = getattr(self.head, "base", self.head)
        return torch.cat([F.cross_entropy((base(h) + lw @ B.T).float(), t, reduction="none")
                          for h, lw, t in zip(hidden.split(chunk), low.split(chunk), target.split(chunk))])

    def trainable(self) -> int:
        """Trainable parameters; for `unadapted` the backbone's total, as the paper's table reports."""
        n = trainable_parameters(self)
        return n or sum(p.numel() for p in self.model.parameters())


def segments(hidden: torch.Tensor, owner: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """n per-line LoRA updates, A (n, r, d_in) and B (n, d_out, r), as one of rank n * r: (low (rows, n * r),
    B (d_out, n * r)) with row j's bottleneck scaling * h_j A_o^T in the r columns of its line o = owner[j] and zeros
    elsewhere, so that low @ B.T = scaling * (h_j A_o^T) B_o^T. The fused loss takes them as it takes one adapter."""
    n, r, d_in = A.shape
    low = scaling * hidden @ A.reshape(n * r, d_in).T  # every line's bottleneck for every row: n * r columns, cheap
    mine = owner[:, None] == torch.arange(n, device=owner.device).repeat_interleave(r)[None, :]
    return low * mine, B.transpose(0, 1).reshape(B.shape[1], n * r)


def hyper_parameters(cfg: Config, model: nn.Module) -> int:
    """Trainable parameters of the `chameleon` hypernetwork on `model`'s head (counted on the module itself, built
    on the meta device: no memory, and never out of date with its architecture)."""
    d_in, d_out = dims(model.get_output_embeddings())
    with torch.device("meta"):
        hyper = HyperNetwork(model.get_input_embeddings().embedding_dim, d_in, d_out, cfg.rank, cfg.hyper_hidden)
    return trainable_parameters(hyper)


def matched_rank(cfg: Config, model: nn.Module) -> int:
    """Head-LoRA rank whose parameter count is nearest the `chameleon` hypernetwork's."""
    return max(1, round(hyper_parameters(cfg, model) / sum(dims(model.get_output_embeddings()))))


def svf_parameters(model: nn.Module) -> int:
    """Trainable parameters of one SVF expert: min(out, in) per adapted MLP matrix (51,840 on SmolLM2-135M)."""
    return sum(min(svf_lib.matrix(layer).shape) for layer in svf_lib.target_layers(model, "mlp").values())


def base_head(cfg: Config, model: nn.Module, flavour: str, k: int) -> nn.Module:
    """The frozen LM head itself."""
    return model.get_output_embeddings()


def lora_head(cfg: Config, model: nn.Module, flavour: str, k: int) -> nn.Module:
    """A head LoRA (rank matched to the hypernetwork's parameters for a `matched_rank` regime), or k of them as
    experts."""
    base = model.get_output_embeddings()
    if k > 1:
        return LoRAExperts(cfg, base, k, cfg.rank, cfg.alpha, flavour)
    rank = matched_rank(cfg, model) if REGIMES[cfg.regime].matched_rank else cfg.rank
    # "scaled": the alpha whose scaling at this rank equals the rank-cfg.rank LoRA's (the same step size)
    alpha = cfg.alpha * scaling(flavour, 1, cfg.rank) / scaling(flavour, 1, rank) if cfg.matched_alpha == "scaled" \
        else cfg.alpha
    return LoRA(base, rank, alpha, flavour, generator=cfg.seed)


def hyper_head(cfg: Config, model: nn.Module, flavour: str, k: int) -> nn.Module:
    """The head whose LoRA the hypernetwork writes from the batch's conditioning vector."""
    return ChameleonHead(model.get_output_embeddings(), model.get_input_embeddings().embedding_dim, cfg.rank,
                         cfg.alpha, flavour, cfg.hyper_hidden, cfg.hyper_dropout)


# What each value of Regime.head builds: (cfg, model, LoRA flavour, experts k) -> the head module. A new adapter kind
# for the head is one entry here (and a Component where it depends on the data: adapters.component).
HEADS = {"base": base_head, "lora": lora_head, "hyper": hyper_head}


def build(cfg: Config, model: nn.Module) -> Adapted:
    """Freeze `model` and attach the adapters of cfg.regime (a row of `regimes.REGIMES`), initialised from cfg.seed.

    The authors' protocol uses the authors' LoRA flavour (A, B ~ N(0, 0.01^2), scale alpha);
    the causal protocol uses ordinary LoRA (B = 0, scale alpha / r).
    """
    regime, flavour = REGIMES[cfg.regime], PROTOCOLS[cfg.protocol].lora
    k = {part: cfg.n_experts if regime.experts == part else 1 for part in ("head", "blocks")}
    freeze(model)
    torch.manual_seed(cfg.seed)  # the hypernetwork draws from the global RNG
    if regime.lora_blocks:
        add_lora(model, "blocks", cfg.rank, cfg.alpha, flavour, generator=cfg.seed + 1)
    svf = SVFExperts(cfg, model, k["blocks"]) if regime.svf_blocks else None
    head = HEADS[regime.head](cfg, model, flavour, k["head"])
    others = (Standardized(head),) if isinstance(head, ChameleonHead) and cfg.cond_norm == "standardize" else ()
    return Adapted(model, head, blocks_adapted=not regime.frozen_body, svf=svf, others=others)
