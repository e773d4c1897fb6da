"""What `Adapted` asks of an adapter component: the one interface training, serving, export and REINFORCE use.

A component learns what depends on the data (`bind`), picks its adapter before each batch (`route`; `route_to` takes
one picked already), reports what a run records (`report`), stores and restores what serving needs (`bound`,
`restore`), and says why it cannot be served (`unservable`). LoRA needs none of it; the hypernetwork's input
statistics (`hypernetwork.Standardized`) and the experts with their dispatch (`experts.Experts`) use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the adapted model calls its components; they only name it
    from chameleon.adapters.model import Adapted


class Component:
    """What `Adapted` asks of an adapter component; the defaults: nothing depends on the data."""

    def bind(self, adapted: "Adapted", train_split, val_split) -> None:
        """Learn what depends on the data before training or evaluation (the experts' groups)."""

    def route(self, adapted: "Adapted", split, batch: list[int]) -> None:
        """Before each batch of `split` (training, evaluation, generation)."""

    def route_to(self, selection) -> None:
        """Before a batch whose adapter was picked already (serving: a group's expert, as `route` picks one)."""

    def report(self) -> dict:
        """What a run records beyond its losses."""
        return {}

    def bound(self) -> dict[str, torch.Tensor]:
        """What `bind` computed that serving needs, stored with the run (runs.save_centroids)."""
        return {}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `bound` returned, for a run loaded without its data."""

    def unservable(self) -> str:
        """Why prompts cannot be served with this component ("": they can)."""
        return ""

    def held_out(self) -> list[int]:
        """Train-split examples that no training batch may contain (what `bind` set aside)."""
        return []
