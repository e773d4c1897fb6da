"""Low-rank adapters (LoRA) around frozen linear layers, in two flavours.

"authors" follows the authors' code: A and B both start as N(0, 0.01^2), so the adapted model
differs from the base one from the first step, and the update is scaled by alpha.
"standard" is ordinary LoRA as in PEFT: A kaiming-uniform, B zero, scaled by alpha / r.

    freeze(model)
    add_lora(model, "head", rank=4, alpha=1.0, flavour=PROTOCOLS[cfg.protocol].lora, generator=cfg.seed)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Flavour:
    """How a LoRA starts and is scaled (regimes.Protocol.lora names one)."""
    per_rank: bool  # the update is scaled by alpha / r (PEFT); else by alpha (the authors' code)
    starts_at_base: bool  # B = 0 (A kaiming-uniform): the adapted model starts as the base one (PEFT); else A and B
    # both start as N(0, 0.01^2) (the authors' code)


FLAVOURS = {"authors": Flavour(per_rank=False, starts_at_base=False),
            "standard": Flavour(per_rank=True, starts_at_base=True)}
WHERE = ("head", "blocks")


def scaling(flavour: str, alpha: float, rank: int) -> float:
    """The factor on the low-rank update B @ A: the one place where the flavours disagree on it.

    Args:
        flavour: "authors" (alpha, as in the authors' code) or "standard" (alpha / rank, as in PEFT).
        alpha: LoRA alpha.
        rank: LoRA rank r.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown LoRA flavour {flavour!r}; choose one of {list(FLAVOURS)}")
    return alpha / rank if FLAVOURS[flavour].per_rank else alpha


def dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer. GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    raise TypeError(f"LoRA wraps nn.Linear or transformers' Conv1D, not {type(layer).__name__}")


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A CPU generator from a seed; None keeps torch's global RNG."""
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


def low_rank_update(base_out: torch.Tensor, low: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """base_out + low @ B.T as one fused addmm: no logits-sized temporaries besides the result
    (about 10-20% of a head step on a 49k vocabulary, see BENCHMARKS.md)."""
    flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), low.reshape(-1, low.shape[-1]), B.T)
    return flat.view_as(base_out)


class LoRA(nn.Module):
    """base(x) + scaling * (x @ A.T) @ B.T around a frozen base layer, with A (r, d_in) and B (d_out, r).

    The base layer is held, not copied, so a head tied to the input embedding stays tied.
    The d_out x d_in update is never formed: x goes through the rank-r bottleneck instead.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, flavour: str = "standard",
                 generator: torch.Generator | int | None = None):
        """
        Args:
            base: nn.Linear or transformers' Conv1D; its parameters are frozen in place.
            rank: LoRA rank r (>= 1).
            alpha: LoRA alpha; see `scaling`.
            flavour: "authors" or "standard"; see the module docstring.
            generator: torch.Generator or int seed for A and B; None uses torch's global RNG.
        """
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be >= 1; rank 0 means no adapter: use regime 'unadapted'")
        self.scaling = scaling(flavour, alpha, rank)
        self.base = base.requires_grad_(False)
        d_in, d_out = dims(base)
        g = as_generator(generator)
        # Drawn on the CPU in float32 so that one seed gives the same adapter on every device and dtype.
        A, B = torch.empty(rank, d_in), torch.empty(d_out, rank)
        if FLAVOURS[flavour].starts_at_base:  # as PEFT: uniform(-1/sqrt(d_in), 1/sqrt(d_in)) for A, and B = 0
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            nn.init.zeros_(B)
        else:  # the authors' code
            nn.init.normal_(A, std=0.01, generator=g)
            nn.init.normal_(B, std=0.01, generator=g)
        w = base.weight
        self.A = nn.Parameter(A.to(device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(B.to(device=w.device, dtype=w.dtype))

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaling * x @ A.T, B): the update is their product, never formed as a d_out x d_in matrix."""
        return x @ self.A.T * self.scaling, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_update(self.base(x), *self.factors(x))

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scaling={self.scaling:g}"


def add_lora(model: nn.Module, where: str, rank: int, alpha: float, flavour: str,
             generator: torch.Generator | int | None = None) -> list[str]:
    """Wrap the LM head or every linear layer of the transformer blocks in LoRA, in place.

    Only the wrapped layers are frozen here: call `freeze(model)` first to train the adapters alone.
    Calling it twice ("head", then "blocks") adapts both; an existing adapter is never wrapped again.

    Args:
        model: a Hugging Face causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...).
        where: "head" (the output embedding) or "blocks" (every nn.Linear / Conv1D but the head).
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha; see `scaling`.
        flavour: "authors" or "standard"; see the module docstring.
        generator: torch.Generator or int seed, consumed layer by layer in module order.

    Returns:
        The names of the wrapped modules.
    """
    # A bad rank or flavour raises in LoRA() before the model is changed.
    if where not in WHERE:
        raise ValueError(f"unknown LoRA placement where={where!r}; choose one of {list(WHERE)}")
    g = as_generator(generator)
    head = model.get_output_embeddings()
    if where == "head":
        if not isinstance(head, (nn.Linear, Conv1D)):
            raise ValueError(f"the LM head of {type(model).__name__} is {type(head).__name__}, not a linear layer")
        names = [name for name, m in model.named_modules() if m is head]
        model.set_output_embeddings(LoRA(head, rank, alpha, flavour, g))
        return names
    inside_adapters = {id(m.base) for m in model.modules() if isinstance(m, LoRA)}
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and m is not head and id(m) not in inside_adapters]
    if not names:
        raise ValueError(f"no nn.Linear or Conv1D layer found in the blocks of {type(model).__name__}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRA(getattr(owner, child), rank, alpha, flavour, g))
    return names


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad False on every parameter of `model`; returns it."""
    return model.requires_grad_(False)


def trainable_parameters(module: nn.Module) -> int:
    """Number of parameters that receive gradients (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
