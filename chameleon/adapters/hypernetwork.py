"""The ChamaleonLLM hypernetwork: a small MLP maps a batch's mean embedding to the LoRA matrices of the LM head.

    head = ChameleonHead(model.get_output_embeddings(), d_cond=768, rank=4, alpha=1.0)
    logits = head(hidden_states, cond=batch_embeddings.mean(0))  # one (A, B) for the whole batch
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from chameleon.adapters.component import Component
from chameleon.adapters.lora import FLAVOURS, dims, low_rank_update, scaling

if TYPE_CHECKING:  # the adapted model calls its components; they only name it
    from chameleon.adapters.model import Adapted


class HyperNetwork(nn.Module):
    """cond -> (A, B): Linear-ReLU-Dropout per hidden width, then Linear(hidden[-1], r * (d_in + d_out)).

    With the paper's widths (64, 32) on GPT-2's head (768 -> 50,257, r = 4) this has 6,786,596 parameters.
    """

    def __init__(self, d_cond: int, d_in: int, d_out: int, rank: int, hidden: tuple[int, ...] = (64, 32),
                 dropout: float = 0.5, flavour: str = "authors"):
        """
        Args:
            d_cond: size of the conditioning vector (the LM's embedding width).
            d_in: input width of the adapted layer; A is (rank, d_in).
            d_out: output width of the adapted layer; B is (d_out, rank).
            rank: LoRA rank r (>= 1).
            hidden: widths of the hidden layers.
            dropout: dropout after each hidden ReLU.
            flavour: "authors" (A and B both start small and random) or "standard" (B starts at zero).
        """
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be >= 1; rank 0 means no adapter: use regime 'unadapted'")
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown LoRA flavour {flavour!r}; choose one of {list(FLAVOURS)}")
        self.rank, self.d_in, self.d_out = rank, d_in, d_out
        layers, width = [], d_cond
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        last = nn.Linear(width, rank * (d_in + d_out))
        # The paper initialises the last layer N(0, 1e-3) so the first adapters are small.
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        if FLAVOURS[flavour].starts_at_base:
            # The rows after the first r * d_in produce B: zero them so B = 0 and the adapted model
            # equals the base model at init, as in ordinary LoRA; A stays random so B learns from step one.
            with torch.no_grad():
                last.weight[rank * d_in:].zero_()
        self.net = nn.Sequential(*layers, last)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_cond,) -> A (r, d_in), B (d_out, r); (n, d_cond) -> A (n, r, d_in), B (n, d_out, r)."""
        out = self.net(cond)
        lead = out.shape[:-1]
        split = self.rank * self.d_in
        return (out[..., :split].reshape(*lead, self.rank, self.d_in),
                out[..., split:].reshape(*lead, self.d_out, self.rank))


class ChameleonHead(nn.Module):
    """A frozen LM head plus a LoRA update whose A and B come from a HyperNetwork of the conditioning vector.

    The head is held, not copied, so its weight stays tied to the input embedding. The hypernetwork reads
    (cond - cond_shift) / cond_scale: the identity unless `standardize` fits them to the training vectors.
    """

    def __init__(self, base: nn.Module, d_cond: int, rank: int, alpha: float, flavour: str = "authors",
                 hidden: tuple[int, ...] = (64, 32), dropout: float = 0.5):
        """
        Args:
            base: the LM head (nn.Linear, possibly without bias); frozen in place.
            d_cond: size of the conditioning vector.
            rank: LoRA rank r (>= 1).
            alpha: LoRA alpha; see `chameleon.adapters.lora.scaling`.
            flavour: "authors" or "standard"; sets the scaling and the hypernetwork's init.
            hidden: hypernetwork hidden widths.
            dropout: hypernetwork dropout.
        """
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = scaling(flavour, alpha, rank)
        d_in, d_out = dims(base)
        w = base.weight
        self.hyper = HyperNetwork(d_cond, d_in, d_out, rank, hidden, dropout, flavour).to(w.device, w.dtype)
        self.register_buffer("cond_shift", torch.zeros(d_cond, device=w.device, dtype=w.dtype))
        self.register_buffer("cond_scale", torch.ones(d_cond, device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def standardize(self, vectors: torch.Tensor, eps: float = 1e-6) -> None:
        """Centre and scale every dimension of what the hypernetwork reads by the mean and std of `vectors`
        (N, d_cond): the per-line training vectors, whose large common component would otherwise make every
        input look alike to it."""
        self.cond_shift.copy_(vectors.mean(0))
        self.cond_scale.copy_(vectors.std(0) + eps)

    def generate_adapter(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) this head would apply for `cond`; see HyperNetwork.forward for shapes."""
        return self.hyper((cond - self.cond_shift) / self.cond_scale)

    def factors(self, hidden: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaling * hidden @ A.T, B) for one adapter shared by the batch (cond 1-D)."""
        A, B = self.generate_adapter(cond)
        return hidden @ A.T * self.scaling, B

    def forward(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Logits of base(hidden) + scaling * (hidden @ A.T) @ B.T, never forming the d_out x d_in update.

        Args:
            hidden: (..., d_in) hidden states, e.g. (B, T, d_in) or (N, d_in).
            cond: (d_cond,) for one adapter shared by the whole batch (the paper), or (n, d_cond)
                for one adapter per example, where n is hidden's first dimension.
        """
        if cond.dim() == 1:
            return low_rank_update(self.base(hidden), *self.factors(hidden, cond))
        A, B = self.generate_adapter(cond)  # example i of hidden goes through its own A[i], B[i]
        delta = torch.einsum("n...r,nor->n...o", torch.einsum("n...i,nri->n...r", hidden, A), B)
        return self.base(hidden) + self.scaling * delta


class Standardized(Component):
    """Config.cond_norm "standardize": the hypernetwork reads every vector centred and scaled per dimension by the
    mean and std of the training split's per-line conditioning vectors (ChameleonHead.standardize), stored with
    the run, so that serving and export apply what training did."""

    def __init__(self, head: ChameleonHead):
        self.head = head

    def bind(self, adapted: "Adapted", train_split, val_split) -> None:
        self.head.standardize(train_split.cond_own)

    def bound(self) -> dict[str, torch.Tensor]:
        return {"cond_shift": self.head.cond_shift.cpu().contiguous(), "cond_scale": self.head.cond_scale.cpu().contiguous()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        if "cond_shift" not in tensors:
            raise ValueError("this run standardizes the hypernetwork's input (cond_norm='standardize') but its folder "
                             "stores no statistics (centroids.safetensors): train it again with this version of the kit")
        with torch.no_grad():
            self.head.cond_shift.copy_(tensors["cond_shift"])
            self.head.cond_scale.copy_(tensors["cond_scale"])
