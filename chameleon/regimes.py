"""Regimes: where the adapters go, described once, as data.

Everything that depends on the regime reads this table: config validation, `model.build`, the
parameter table, the colours of the figures and the conventions of the results tables. Adding a
regime is one row here and, if it needs a new kind of adapter, its case in `model.build`.

This module imports nothing heavy, so a bad `--regime` is refused before torch is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    name: str
    head: str  # "base" (the frozen LM head), "lora" (one learned LoRA) or "hyper" (LoRA written by the hypernetwork)
    blocks: str  # "frozen"; "lora": LoRA on every linear / Conv1D layer of the blocks as well; "svf": Transformer²'s
    # SVF on the blocks' MLP matrices (their singular values rescaled by sigmoid(z), see chameleon.svf)
    colour: str  # its colour in every figure (Okabe-Ito, colour-blind safe)
    about: str  # one line for tables and the README
    matched_rank: bool = False  # head LoRA rank chosen so that its parameters match the hypernetwork's
    experts: bool = False  # svf: one expert per coarse group of the data (cfg.n_experts), picked per batch by cfg.dispatch

    @property
    def conditioned(self) -> bool:
        """Whether the hypernetwork reads a conditioning vector (cfg.conditioning applies)."""
        return self.head == "hyper"

    @property
    def frozen_body(self) -> bool:
        """Nothing in the transformer blocks trains: the body's hidden states can be computed once."""
        return self.blocks == "frozen"

    @property
    def passes(self) -> int:
        """Forward passes per request at inference: 2 when a first pass picks the expert (Transformer²'s dispatch)."""
        return 2 if self.experts else 1


REGIMES: dict[str, Regime] = {r.name: r for r in [
    Regime("unadapted", "base", "frozen", "#7f7f7f", "the frozen backbone (the paper reports its total parameters)"),
    Regime("lora", "lora", "frozen", "#0072B2",
           "LoRA on the LM head: the paper's effective 'LoRA' (its block LoRA wrapped nn.Linear, GPT-2's blocks are Conv1D)"),
    Regime("chameleon", "hyper", "frozen", "#E69F00",
           "the hypernetwork writes the head's LoRA from the batch: the paper's effective ChamaleonLLM"),
    Regime("lora_full", "lora", "lora", "#56B4E9", "what the paper describes: LoRA on every block layer and the head"),
    Regime("chameleon_full", "hyper", "lora", "#D55E00", "LoRA on every block layer + the hypernetwork head"),
    Regime("lora_matched", "lora", "frozen", "#009E73",
           "head LoRA with as many parameters as `chameleon`: the fair baseline the paper lacks", matched_rank=True),
    Regime("svf", "base", "svf", "#CC79A7",
           "Transformer²'s SVF: one expert z rescales the singular values of every MLP matrix, trained on all data"),
    Regime("svf_experts", "base", "svf", "#000000",
           "Transformer²: one SVF expert per coarse k-means group, chosen per batch by a first pass (cfg.dispatch)",
           experts=True),
]}


def conditioning_label(regime: str, conditioning: str, dispatch: str | None = None) -> str:
    """The conditioning as results tables show it: "-" for regimes without a hypernetwork; for
    SVF experts, how the expert is dispatched ("dispatch=oracle", ...)."""
    if REGIMES[regime].experts:
        return f"dispatch={dispatch or 'oracle'}"
    return conditioning if REGIMES[regime].conditioned else "-"
