"""One adapter per group of the data, and the dispatch that picks one (or a mixture) per batch at inference.

`Experts` is the one mechanism, whatever the adapter kind: `LoRAExperts` (one head LoRA per group, here) and
`svf.SVFExperts` (Transformer²'s singular-value experts). The dispatches are the rows of `regimes.DISPATCHES`:
`oracle` (the batch's true group), `classifier` (the nearest group centroid of the batch's prompts) and `cem` (a
few-shot cross-entropy-method search over mixtures, `cem_search`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chameleon import objectives
from chameleon.adapters.component import Component
from chameleon.adapters.lora import LoRA, trainable_parameters
from chameleon.clustering import assign, eval_batches, kmeans, route_batch
from chameleon.config import Config
from chameleon.prepare import trimmed
from chameleon.regimes import DISPATCHES, MIXABLE_KINDS, REGIMES

if TYPE_CHECKING:  # the adapted model calls its components; they only name it
    from chameleon.adapters.model import Adapted


class Experts(Component, nn.Module):
    """K adapters of one kind (subclasses: SVF z vectors, head LoRAs), one per coarse group of the data, and
    the dispatch (`regimes.DISPATCHES`, cfg.dispatch) that picks one, or a mixture, for each batch.

    Groups (K > 1): a seeded k-means (k = cfg.n_experts) of the train split's cluster embeddings. A training
    batch (drawn from one fine cluster) trains the expert of its examples' majority group, whatever the
    dispatch: the dispatch is chosen at inference (runs.trained_by). At evaluation "oracle" takes the
    majority of the validation examples' nearest group centroids (by their own full-text embedding: an
    upper bound), "classifier" the group whose prompt centroid is nearest the batch's mean prompt embedding
    (Split.prompt_emb: the first prefix_tokens tokens for lm, the prompt for instructions; no forward pass),
    "cem" a mixture sum_k alpha_k of the experts whose alpha a CEM search (`cem_search`, below) fits to the mean
    log-likelihood of cfg.cem_shots train examples of the batch's true group (left out of training when
    cfg.cem_held_out, as Transformer²'s few-shot examples are).
    """

    def __init__(self, cfg: Config, k: int):
        nn.Module.__init__(self)
        self.cfg, self.k, self.dispatch = cfg, k, DISPATCHES[cfg.dispatch]
        self.selection: int | tuple[float, ...] | list[int] = 0  # an expert, a mixture, or one expert per line
        self.groups: dict[str, np.ndarray] = {}  # split name -> (N,) group of each example
        self.prompt_centroids: torch.Tensor | None = None  # (K, d): what the classifier compares a batch with
        self.accuracy: float | None = None
        self.searching = False  # True while CEM scores candidates (a few shots: SVF applies z factored)
        self._cem: dict[int, tuple[float, ...]] = {}  # group -> CEM mixing weights
        self.shots: dict[int, list[int]] = {}  # group -> the train examples CEM scores

    def per_expert(self) -> int:
        return trainable_parameters(self.experts[0])

    def train(self, mode: bool = True) -> "Experts":
        self._cem.clear()  # the experts are about to change
        return nn.Module.train(self, mode)

    def bind(self, adapted: "Adapted", train_split, val_split) -> None:
        if self.k == 1:
            self.groups = {s.name: np.zeros(len(s), dtype=np.int64) for s in (train_split, val_split)}
            return
        if self.cfg.groups_by_domain:  # an oracle control: the groups are the true domains
            labels, val_labels = domain_groups(train_split, val_split, self.k)
        else:
            labels, centroids = kmeans(train_split.cluster_emb, self.k, self.cfg.seed)
            val_labels = assign(val_split.cluster_emb, centroids)
        self.groups = {"train": labels, "validation": val_labels}
        prompt = train_split.prompt_emb
        self.prompt_centroids = torch.stack([prompt[torch.from_numpy(labels == g)].mean(0) if (labels == g).any()
                                             else torch.zeros(prompt.shape[1]) for g in range(self.k)])
        rng = np.random.default_rng(self.cfg.seed)
        for g in range(self.k):
            members = np.flatnonzero(labels == g)
            self.shots[g] = sorted(rng.choice(members, min(self.cfg.cem_shots, len(members)), replace=False).tolist())
        self.train_split = train_split
        batches = [b for b, _ in eval_batches(val_split.labels, self.cfg.batch_size, self.cfg.conditioning)]
        hits = [self._by_oracle(adapted, val_split, b) == self._by_classifier(adapted, val_split, b) for b in batches]
        self.accuracy = float(np.mean(hits)) if hits else None

    def held_out(self) -> list[int]:
        searchable = REGIMES[self.cfg.regime].expert_kind in MIXABLE_KINDS  # only a mixture is searched with shots
        return sorted(i for shots in self.shots.values() for i in shots) if self.cfg.cem_held_out and searchable else []

    def bound(self) -> dict[str, torch.Tensor]:
        return {} if self.prompt_centroids is None else {"prompt_centroids": self.prompt_centroids.contiguous()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        if "prompt_centroids" in tensors:
            self.prompt_centroids = tensors["prompt_centroids"]

    def route(self, adapted: "Adapted", split, batch: list[int]) -> None:
        if self.k == 1:
            self.selection = 0
        elif not self.groups:
            raise RuntimeError(f"{self.cfg.regime} has no groups: call adapted.bind(train_split, val_split) first")
        elif self.training or split.name == "train":  # training routes by the true group, whatever the dispatch
            self.selection = self._by_oracle(adapted, split, batch)
        else:
            self.selection = getattr(self, f"_by_{self.dispatch.name}")(adapted, split, batch)

    def route_to(self, selection) -> None:
        self.selection = selection

    def _by_oracle(self, adapted: "Adapted", split, batch: list[int]) -> int:
        """The majority group of the batch's examples."""
        return int(np.bincount(self.groups[split.name][batch], minlength=self.k).argmax())

    def _by_classifier(self, adapted: "Adapted", split, batch: list[int]) -> int:
        return self.choose(split.prompt_emb[batch])

    def _by_oracle_line(self, adapted: "Adapted", split, batch: list[int]) -> list[int]:
        """Each line's own true group (a per-line dispatch: the head applies one expert per line)."""
        return [int(g) for g in self.groups[split.name][batch]]

    def _by_classifier_line(self, adapted: "Adapted", split, batch: list[int]) -> list[int]:
        """Each line's own nearest prompt centroid."""
        return [self.choose(split.prompt_emb[[i]]) for i in batch]

    def choose(self, prompt_emb: torch.Tensor) -> int:
        """The classifier dispatch of a batch of prompts: the group whose prompt centroid is nearest their
        mean prompt embedding."""
        if self.k == 1:
            return 0
        if self.prompt_centroids is None:
            raise RuntimeError(f"{self.cfg.regime} has no prompt centroids: bind it to its data, or load a run "
                               "trained by this version of the kit")
        return route_batch(prompt_emb, self.prompt_centroids)

    @torch.no_grad()
    def _by_cem(self, adapted: "Adapted", split, batch: list[int]) -> tuple[float, ...]:
        """Mixing weights for the batch's true group, by CEM on the mean log-likelihood of its few train
        shots (searched once per group until the next train() call)."""
        group = self._by_oracle(adapted, split, batch)
        if group in self._cem:
            return self._cem[group]
        shots = self.shots[group]
        dev = next(adapted.parameters()).device
        ids, attention, target = (t.to(dev) for t in trimmed(self.train_split, shots))
        scored = target != objectives.IGNORE

        def score(alpha: torch.Tensor) -> float:
            self.selection = tuple(alpha.tolist())
            hidden = adapted.hidden(ids, attention)
            return -F.cross_entropy(adapted.logits(hidden[scored]).float(), target[scored]).item()

        self.searching = True
        try:
            alpha = cem_search(score, self.k, population=self.cfg.cem_population, elite_ratio=0.2,
                                       iters=self.cfg.cem_iters, seed=self.cfg.seed + group)
        finally:
            self.searching = False
        self._cem[group] = tuple(alpha.tolist())
        return self._cem[group]

    def report(self) -> dict:
        # one forward pass per request: the classifier reads the embedding table, CEM searches once per group
        out = {"params_per_expert": self.per_expert(), "n_experts": self.k, "passes": 1}
        if self.k > 1:
            out["dispatch"] = self.dispatch.name
            if self.dispatch.mixes:
                out["cem_shots"] = self.cfg.cem_shots
                out["search_forwards"] = self.cfg.cem_population * self.cfg.cem_iters  # per group, on the shots
            if self.accuracy is not None:
                out["dispatch_accuracy"] = self.accuracy  # classifier == oracle, share of validation batches
        return out

    def unservable(self) -> str:
        if self.k > 1 and self.dispatch.uses_truth:
            return (f"dispatch {self.dispatch.name!r} reads the true group of validation examples, which a served "
                    f"prompt does not have; serve the run with dispatch='classifier' (Adapter.from_run(run, "
                    f"dispatch='classifier')): the experts are the same")
        return ""


def domain_groups(train_split, val_split, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each example's group when the groups are the corpus's domains (Config.expert_groups "domain")."""
    if train_split.domains is None:
        raise ValueError("expert_groups='domain' reads each line's domain, and this corpus has none; use "
                         "--corpus domains or a JSONL corpus with a \"domain\" field on every line")
    names = sorted(set(train_split.domains))
    if len(names) != k:
        raise ValueError(f"expert_groups='domain': the corpus has {len(names)} domains but n_experts={k}; "
                         f"set --n-experts {len(names)}")
    if missing := sorted(set(val_split.domains) - set(names)):
        raise ValueError(f"validation domain(s) {missing} have no training line, so no expert")
    code = {d: i for i, d in enumerate(names)}
    return (np.array([code[d] for d in train_split.domains]), np.array([code[d] for d in val_split.domains]))


class LoRAExperts(Experts):
    """One head LoRA per group (the regime `lora_experts`): the "multiple expert models" the paper avoids.
    The active expert's LoRA is the head; the experts cannot be mixed (regimes.MIXABLE_KINDS)."""

    def __init__(self, cfg: Config, base: nn.Module, k: int, rank: int, alpha: float, flavour: str):
        super().__init__(cfg, k)
        self.base = base.requires_grad_(False)
        self.experts = nn.ModuleList(LoRA(base, rank, alpha, flavour, generator=cfg.seed * 1000 + j) for j in range(k))
        self.scaling = self.experts[0].scaling

    @property
    def active(self) -> LoRA:
        return self.experts[self.selection]

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.active.factors(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active(x)

    def generate_adapter(self, selections: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, r, d_in) and (G, d_out, r): the A and B of each group's expert (as ChameleonHead.generate_adapter)."""
        return (torch.stack([self.experts[s].A for s in selections]),
                torch.stack([self.experts[s].B for s in selections]))


def cem_search(score_fn: Callable[[torch.Tensor], float | tuple], n_experts: int, population: int = 32,
               elite_ratio: float = 0.2, iters: int = 10, seed: int = 0, init: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Cross-entropy-method search for mixing weights alpha in [0, 1]^K that maximise score_fn(alpha).

    The search starts at `init` (uniform 1/K) with std 0.5 (half the range); each iteration samples
    `population` candidates clipped to [0, 1], keeps the best so far as candidate 0 (re-evaluated), and
    refits mean and std to the elites. Population and elite ratio are the reference's defaults; its
    few-shot evaluation script differs (50 iterations, per-layer, unnormalised coefficients): see
    docs/transformer2.md.

    Args:
        score_fn: alpha (K,) -> score, e.g. the mean log-likelihood of a few held-out examples under
            mix(experts, alpha). It may return a tuple (score, log_likelihood): tuples compare in order,
            so equal scores (e.g. task accuracy) are ranked by log-likelihood, as the reference does.
        n_experts: K.
        population: candidates per iteration (reference 32).
        elite_ratio: share of the population the distribution is refitted to (reference 0.2).
        iters: iterations; score_fn is called population * iters times.
        seed: seeds the sampling.
        init: initial mean (default uniform 1/K).

    Returns:
        The best alpha found, (K,), unnormalised (mix normalises).
    """
    g = torch.Generator().manual_seed(seed)
    n_elites = max(1, int(elite_ratio * population))
    mean = torch.full((n_experts,), 1 / n_experts) if init is None else torch.as_tensor(init, dtype=torch.float32)
    std = torch.full((n_experts,), 0.5)
    best = mean.clone()
    for _ in range(iters):
        pop = (mean + std * torch.randn(population, n_experts, generator=g)).clamp(0, 1)
        pop[0] = best  # re-evaluate the best so far: a noisy score cannot keep a lucky candidate forever
        scores = [score_fn(a) for a in pop]
        order = sorted(range(population), key=lambda i: scores[i], reverse=True)
        best = pop[order[0]].clone()
        elites = pop[order[:n_elites]]
        mean = elites.mean(0)
        if n_elites > 1:
            std = elites.std(0)
    return best
