"""The adapted model: a frozen backbone with the adapters of one regime (see `chameleon.regimes`).

    adapted = build(cfg, model)        # cfg.regime, initialised from cfg.seed
    adapted.bind(train_split, val_split)  # adapters that depend on the data (SVF experts' groups); else a no-op
    adapted.route(split, batch)        # before a batch: the SVF experts pick theirs; else a no-op
    logits = adapted.logits(adapted.hidden(ids, attention), cond)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from chameleon import objectives, svf as svf_lib
from chameleon.clustering import assign, eval_batches, kmeans, route_batch
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

    def __init__(self, model: nn.Module, head: nn.Module, blocks_adapted: bool, svf: "SVFExperts | None" = None):
        super().__init__()
        self.model, self.head, self.blocks_adapted, self.svf = model, head, blocks_adapted, svf
        self.conditioned = isinstance(head, ChameleonHead)

    def train(self, mode: bool = True) -> "Adapted":
        super().train(mode)
        if not self.blocks_adapted:
            self.model.eval()  # a frozen, unadapted body: no dropout noise, as in the cached path
        return self

    def body(self, **kwargs):
        """The body's forward (`model.base_model`), with the selected SVF expert's W' in place of the
        adapted weights when there are experts: the model itself is never modified. With gradients on
        (training z) each layer applies W' factored, x -> Vh x -> s' * -> U (svf.SVF.factored): about 2x
        cheaper a step than rebuilding all W' from z (benchmarks/bench_svf.py); without, W' is built once
        per selection."""
        if self.svf is None:
            return self.model.base_model(**kwargs)
        if torch.is_grad_enabled():
            with self.svf.svf.factored(self.model, self.svf.zs()):
                return self.model.base_model(**kwargs)
        return functional_call(self.model.base_model, self.svf.weights(), args=(), kwargs=kwargs)

    def hidden(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(B, L, d) final hidden states (after the last layer norm)."""
        return self.body(input_ids=input_ids, attention_mask=attention).last_hidden_state

    def bind(self, train_split, val_split) -> None:
        """Give data-dependent adapters their data (the SVF experts' groups); a no-op otherwise."""
        if self.svf is not None:
            self.svf.bind(self, train_split, val_split)

    def route(self, split, batch: list[int]) -> None:
        """Called before each batch (training, evaluation, generation): the SVF experts select the
        expert (or mixture) of the batch, the first of Transformer²'s two passes; a no-op otherwise."""
        if self.svf is not None:
            self.svf.route(self, split, batch)

    def report(self) -> dict:
        """What a run records beyond its losses (SVF: parameters per expert, passes, dispatch accuracy)."""
        return {} if self.svf is None else self.svf.report()

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


def svf_parameters(model: nn.Module) -> int:
    """Trainable parameters of one SVF expert: min(out, in) per adapted MLP matrix (51,840 on SmolLM2-135M)."""
    return sum(min(svf_lib.matrix(layer).shape) for layer in svf_lib.target_layers(model, "mlp").values())


class SVFExperts(nn.Module):
    """Transformer²'s SVF experts on a frozen body: K vectors z (one per expert) over one cached SVD.

    Expert k turns every adapted matrix W = U diag(S) Vh into U diag(S sigmoid(z_k)) Vh * sum S / sum(S
    sigmoid(z_k)) (`svf.SVFMatrix.weight`); `Adapted.body` runs the body with those W' through
    torch.func.functional_call, so the model's own weights are never touched (nothing to restore).
    With gradients on, W' is applied factored (never formed); without (evaluation, generation), W' is
    built once per selection and kept until the next train() call.

    Groups (K > 1): a coarse k-means (k = cfg.n_experts, seeded) of the train split's cluster
    embeddings. A training batch (drawn from one fine cluster) trains the expert of its examples'
    majority group (oracle routing). At evaluation cfg.dispatch picks: "oracle" the majority of the
    validation examples' nearest coarse centroids (by their own embedding), "classifier" the group
    centroid nearest the batch's mean prompt embedding (Split.prompt_emb: the first prefix_tokens
    tokens for lm, the prompt for instructions), "cem" a mixture sum_k alpha_k z_k whose alpha a CEM
    search (svf.cem_search) fits to the mean log-likelihood of cfg.cem_shots train examples of the
    batch's (true) group.
    """

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.cfg, self.k = cfg, cfg.n_experts if REGIMES[cfg.regime].experts else 1
        self.svf = svf_lib.SVF(svf_lib.decompose(model, "mlp", cfg.cache_dir), generator=cfg.seed)
        self.svf.requires_grad_(False)  # holds U, S, Vh; the trained z's are in self.experts
        self.names = self.svf.names
        prefix = model.base_model_prefix + "."
        self.keys = {n: (n[len(prefix):] if n.startswith(prefix) else n) + ".weight" for n in self.names}
        for key in self.keys.values():  # a name that missed the body would be ignored by functional_call: refuse it
            model.base_model.get_parameter(key)
        self.conv1d = {n: isinstance(model.get_submodule(n), Conv1D) for n in self.names}
        self.dtype = svf_lib.original_weight(model.get_submodule(self.names[0])).dtype
        self.experts = nn.ModuleList()
        for k in range(self.k):  # the reference's init, 0.1 + N(0, 0.01^2), drawn per expert
            g = torch.Generator().manual_seed(cfg.seed * 1000 + k)
            self.experts.append(nn.ParameterDict({
                svf_lib.SVF._slot(n): nn.Parameter((0.1 + 0.01 * torch.randn(self.svf[n].S.shape, generator=g))
                                                   .to(self.svf[n].S.device)) for n in self.names}))
        self.selection: int | tuple[float, ...] = 0
        self._cache: dict = {}  # selection -> W' (no-grad, eval mode only)
        self._cem: dict[int, tuple[float, ...]] = {}  # group -> CEM mixing weights
        self.groups: dict[str, np.ndarray] = {}
        self.accuracy: float | None = None

    def train(self, mode: bool = True) -> "SVFExperts":
        self._cache.clear()  # z is about to change
        self._cem.clear()
        return super().train(mode)

    def per_expert(self) -> int:
        return sum(self.svf[n].S.numel() for n in self.names)

    def expert(self, k: int) -> dict[str, torch.Tensor]:
        """Expert k as {layer name: z} (the trained Parameters themselves)."""
        return {n: self.experts[k][svf_lib.SVF._slot(n)] for n in self.names}

    def zs(self) -> dict[str, torch.Tensor]:
        if isinstance(self.selection, int):
            return self.expert(self.selection)
        return svf_lib.mix([self.expert(k) for k in range(self.k)], list(self.selection))

    def weights(self) -> dict[str, torch.Tensor]:
        """{body parameter name: W'} for the current selection, in the layers' orientation and dtype."""
        key = self.selection
        if not torch.is_grad_enabled() and key in self._cache:
            return self._cache[key]
        out = self._build()
        if not torch.is_grad_enabled() and not self.training:
            if len(self._cache) >= self.k:
                self._cache.clear()
            self._cache[key] = out
        return out

    def _build(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, z in self.zs().items():
            w = self.svf.weight(n, z)
            out[self.keys[n]] = (w.T if self.conv1d[n] else w).to(self.dtype)
        return out

    def bind(self, adapted: Adapted, train_split, val_split) -> None:
        if self.k == 1:
            self.groups = {s.name: np.zeros(len(s), dtype=np.int64) for s in (train_split, val_split)}
            return
        labels, centroids = kmeans(train_split.cluster_emb, self.k, self.cfg.seed)
        self.groups = {"train": labels, "validation": assign(val_split.cluster_emb, centroids)}
        prompt = train_split.prompt_emb
        self.prompt_centroids = torch.stack([prompt[torch.from_numpy(labels == g)].mean(0) if (labels == g).any()
                                             else torch.zeros(prompt.shape[1]) for g in range(self.k)])
        self.val_prompt_emb = val_split.prompt_emb
        rng = np.random.default_rng(self.cfg.seed)
        self.shots = {}
        for g in range(self.k):
            members = np.flatnonzero(labels == g)
            self.shots[g] = sorted(rng.choice(members, min(self.cfg.cem_shots, len(members)), replace=False).tolist())
        self.train_split = train_split
        batches = [b for b, _ in eval_batches(val_split.labels, self.cfg.batch_size, self.cfg.conditioning)]
        hits = [self.oracle("validation", b) == self.classify(b) for b in batches]
        self.accuracy = float(np.mean(hits)) if hits else None

    def oracle(self, split_name: str, batch: list[int]) -> int:
        """The majority group of the batch's examples."""
        return int(np.bincount(self.groups[split_name][batch], minlength=self.k).argmax())

    def classify(self, batch: list[int]) -> int:
        """The group whose prompt centroid is nearest the batch's mean prompt embedding."""
        return route_batch(self.val_prompt_emb[batch], self.prompt_centroids)

    def route(self, adapted: Adapted, split, batch: list[int]) -> None:
        if self.k == 1:
            self.selection = 0
        elif not self.groups:
            raise RuntimeError("svf_experts has no groups: call adapted.bind(train_split, val_split) first")
        elif self.training or split.name == "train" or self.cfg.dispatch == "oracle":
            self.selection = self.oracle(split.name, batch)
        elif self.cfg.dispatch == "classifier":
            self.selection = self.classify(batch)
        else:
            self.selection = self.cem_alpha(adapted, self.oracle(split.name, batch))

    @torch.no_grad()
    def cem_alpha(self, adapted: Adapted, group: int) -> tuple[float, ...]:
        """Mixing weights for `group`, by CEM on the mean log-likelihood of its few train shots
        (searched once per group until the next train() call)."""
        memo = self._cem
        if group in memo:
            return memo[group]
        split, shots = self.train_split, self.shots[group]
        dev = self.svf[self.names[0]].S.device
        target = split.targets[shots]
        end = int((target != objectives.IGNORE).any(0).nonzero().max()) + 1
        ids, attention, target = split.input_ids[shots, :end].to(dev), split.attention[shots, :end].to(dev), target[:, :end].to(dev)
        scored = target != objectives.IGNORE

        def score(alpha: torch.Tensor) -> float:
            self.selection = tuple(alpha.tolist())
            # factored: a few shots are far fewer rows than W' has columns, so building the 90 W' would cost more
            with self.svf.factored(adapted.model, self.zs()):
                hidden = adapted.model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
            return -F.cross_entropy(adapted.logits(hidden[scored]).float(), target[scored]).item()

        alpha = svf_lib.cem_search(score, self.k, population=self.cfg.cem_population, elite_ratio=0.2,
                                   iters=self.cfg.cem_iters, seed=self.cfg.seed + group)
        memo[group] = tuple(alpha.tolist())
        return memo[group]

    def report(self) -> dict:
        out = {"params_per_expert": self.per_expert(), "n_experts": self.k,
               "passes": REGIMES[self.cfg.regime].passes}
        if self.k > 1:
            out["dispatch"] = self.cfg.dispatch
            if self.cfg.dispatch == "cem":
                out["cem_shots"] = self.cfg.cem_shots
            if self.accuracy is not None:
                out["dispatch_accuracy"] = self.accuracy  # classifier == oracle, share of validation batches
        return out


def build(cfg: Config, model: nn.Module) -> Adapted:
    """Freeze `model` and attach the adapters of cfg.regime (a row of `regimes.REGIMES`), initialised from cfg.seed.

    The authors' protocol uses the authors' LoRA flavour (A, B ~ N(0, 0.01^2), scale alpha);
    the causal protocol uses ordinary LoRA (B = 0, scale alpha / r).
    """
    flavour, regime = FLAVOUR[cfg.protocol], REGIMES[cfg.regime]
    freeze(model)
    torch.manual_seed(cfg.seed)  # the hypernetwork draws from the global RNG
    if regime.blocks == "lora":
        add_lora(model, "blocks", cfg.rank, cfg.alpha, flavour, generator=cfg.seed + 1)
    experts = SVFExperts(cfg, model) if regime.blocks == "svf" else None
    base = model.get_output_embeddings()
    if regime.head == "base":
        head = base
    elif regime.head == "lora":
        rank = matched_rank(cfg, model) if regime.matched_rank else cfg.rank
        head = LoRA(base, rank, cfg.alpha, flavour, generator=cfg.seed)
    else:
        head = ChameleonHead(base, model.get_input_embeddings().embedding_dim, cfg.rank, cfg.alpha, flavour,
                             cfg.hyper_hidden, cfg.hyper_dropout)
    return Adapted(model, head, blocks_adapted=not regime.frozen_body, svf=experts)
