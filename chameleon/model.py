"""The adapted model: a frozen backbone and the adapter components of one regime (see `chameleon.regimes`).

    adapted = build(cfg, model)           # cfg.regime's components, initialised from cfg.seed
    adapted.bind(train_split, val_split)  # components that depend on the data (the experts' groups)
    adapted.route(split, batch)           # before each batch: the experts pick theirs
    logits = adapted.logits(adapted.hidden(ids, attention), cond)

The head is the frozen LM head, a `LoRA`, a `ChameleonHead` (LoRA written by the hypernetwork) or
`LoRAExperts`; the body is frozen, carries block LoRA (in place), or runs under `SVFExperts`.
Components that depend on the data answer the `Component` calls; `Experts` is the one mechanism for
"one adapter per group of the data, picked per batch", whatever the adapter kind.
"""
from __future__ import annotations

import hashlib

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
from chameleon.lora import LoRA, add_lora, dims, freeze, scaling, trainable_parameters
from chameleon.prepare import trimmed
from chameleon.regimes import DISPATCHES, MIXABLE_KINDS, PROTOCOLS, REGIMES


class Component:
    """What `Adapted` asks of an adapter component; the defaults: nothing depends on the data."""

    def bind(self, adapted: "Adapted", train_split, val_split) -> None:
        """Learn what depends on the data before training or evaluation (the experts' groups)."""

    def route(self, adapted: "Adapted", split, batch: list[int]) -> None:
        """Before each batch of `split` (training, evaluation, generation)."""

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


class Experts(Component, nn.Module):
    """K adapters of one kind (subclasses: SVF z vectors, head LoRAs), one per coarse group of the data, and
    the dispatch (`regimes.DISPATCHES`, cfg.dispatch) that picks one, or a mixture, for each batch.

    Groups (K > 1): a seeded k-means (k = cfg.n_experts) of the train split's cluster embeddings. A training
    batch (drawn from one fine cluster) trains the expert of its examples' majority group, whatever the
    dispatch: the dispatch is chosen at inference (runs.trained_by). At evaluation "oracle" takes the
    majority of the validation examples' nearest group centroids (by their own full-text embedding: an
    upper bound), "classifier" the group whose prompt centroid is nearest the batch's mean prompt embedding
    (Split.prompt_emb: the first prefix_tokens tokens for lm, the prompt for instructions; no forward pass),
    "cem" a mixture sum_k alpha_k of the experts whose alpha a CEM search (svf.cem_search) fits to the mean
    log-likelihood of cfg.cem_shots train examples of the batch's true group (left out of training when
    cfg.cem_held_out, as Transformer²'s few-shot examples are).
    """

    def __init__(self, cfg: Config, k: int):
        nn.Module.__init__(self)
        self.cfg, self.k, self.dispatch = cfg, k, DISPATCHES[cfg.dispatch]
        self.selection: int | tuple[float, ...] = 0
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
        if self.cfg.expert_groups == "domain":  # an oracle control: the groups are the true domains
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

    def _by_oracle(self, adapted: "Adapted", split, batch: list[int]) -> int:
        """The majority group of the batch's examples."""
        return int(np.bincount(self.groups[split.name][batch], minlength=self.k).argmax())

    def _by_classifier(self, adapted: "Adapted", split, batch: list[int]) -> int:
        return self.choose(split.prompt_emb[batch])

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
            alpha = svf_lib.cem_search(score, self.k, population=self.cfg.cem_population, elite_ratio=0.2,
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


class SVFExperts(Experts):
    """Transformer²'s SVF on a frozen body: K vectors z (one per expert) over one cached SVD.

    Expert k turns every adapted matrix W = U diag(S) Vh into U diag(S sigmoid(z_k)) Vh * sum S / sum(S
    sigmoid(z_k)) (`svf.SVF`). The model's own weights are never touched. Two ways to apply it: with
    gradients on (training z) or while CEM scores a few shots, each layer computes x W'^T factored
    (svf.SVF.factored, about 2x cheaper a step than rebuilding every W'; benchmarks/bench_svf.py);
    otherwise W' is built once per selection and the body runs on it through torch.func.functional_call.
    """

    def __init__(self, cfg: Config, model: nn.Module, k: int):
        super().__init__(cfg, k)
        self.svf = svf_lib.SVF(svf_lib.decompose(model, "mlp", cfg.cache_dir))
        self.names = self.svf.names
        prefix = model.base_model_prefix + "."
        self.keys = {n: (n[len(prefix):] if n.startswith(prefix) else n) + ".weight" for n in self.names}
        for key in self.keys.values():  # a name that missed the body would be ignored by functional_call: refuse it
            model.base_model.get_parameter(key)
        self.conv1d = {n: isinstance(model.get_submodule(n), Conv1D) for n in self.names}
        self.dtype = model.get_submodule(self.names[0]).weight.dtype
        self.experts = nn.ModuleList()
        for j in range(k):  # the reference's init, 0.1 + N(0, 0.01^2), drawn per expert on the CPU
            g = torch.Generator().manual_seed(cfg.seed * 1000 + j)
            self.experts.append(nn.ParameterDict({
                svf_lib.SVF.slot(n): nn.Parameter((0.1 + 0.01 * torch.randn(self.svf[n].S.shape, generator=g))
                                                  .to(self.svf[n].S.device)) for n in self.names}))
        self._weights: dict = {}  # hash of the selected z's -> W', built without gradients

    def expert(self, k: int) -> dict[str, torch.Tensor]:
        """Expert k as {layer name: z} (the trained Parameters themselves)."""
        return {n: self.experts[k][svf_lib.SVF.slot(n)] for n in self.names}

    def zs(self) -> dict[str, torch.Tensor]:
        """The selected expert's z, or the mixture of a CEM selection."""
        if isinstance(self.selection, int):
            return self.expert(self.selection)
        return svf_lib.mix([self.expert(k) for k in range(self.k)], list(self.selection))

    def body(self, model: nn.Module, **kwargs):
        """model.base_model(**kwargs) with the selected expert applied."""
        if torch.is_grad_enabled() or self.searching:
            with self.svf.factored(model, self.zs()):
                return model.base_model(**kwargs)
        return functional_call(model.base_model, self.weights(), args=(), kwargs=kwargs)

    def _build(self, zs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.keys[n]: (w.T if self.conv1d[n] else w).to(self.dtype)
                for n, w in ((n, self.svf.weight(n, z)) for n, z in zs.items())}

    def weights(self) -> dict[str, torch.Tensor]:
        """{body parameter name: W'} for the current selection, in the layers' orientation and dtype. Built
        without gradients, it is kept until a z changes (the key hashes the selected z's bytes: version counters
        would not do, a fused optimizer updates in place without bumping them); with gradients on, built anew
        (its graph is the caller's)."""
        zs = self.zs()
        if torch.is_grad_enabled():
            return self._build(zs)
        key = hashlib.blake2b(b"".join(z.detach().cpu().numpy().tobytes() for z in zs.values())).hexdigest()
        if key not in self._weights:
            if len(self._weights) >= self.k:
                self._weights.clear()
            self._weights[key] = self._build(zs)
        return self._weights[key]


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

    def row_losses(self, hidden: torch.Tensor, target: torch.Tensor, cond: torch.Tensor | None = None,
                   chunk: int = CHUNK) -> torch.Tensor:
        """(rows,) cross-entropy of every row (evaluation: the logits of one chunk at a time)."""
        return torch.cat([F.cross_entropy(self.logits(h, cond).float(), t, reduction="none")
                          for h, t in zip(hidden.split(chunk), target.split(chunk))])

    def trainable(self) -> int:
        """Trainable parameters; for `unadapted` the backbone's total, as the paper's table reports."""
        n = trainable_parameters(self)
        return n or sum(p.numel() for p in self.model.parameters())


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


def build(cfg: Config, model: nn.Module) -> Adapted:
    """Freeze `model` and attach the adapters of cfg.regime (a row of `regimes.REGIMES`), initialised from cfg.seed.

    The authors' protocol uses the authors' LoRA flavour (A, B ~ N(0, 0.01^2), scale alpha);
    the causal protocol uses ordinary LoRA (B = 0, scale alpha / r).
    """
    regime, flavour = REGIMES[cfg.regime], PROTOCOLS[cfg.protocol].lora
    k = {part: cfg.n_experts if regime.experts == part else 1 for part in ("head", "blocks")}
    freeze(model)
    torch.manual_seed(cfg.seed)  # the hypernetwork draws from the global RNG
    if regime.blocks == "lora":
        add_lora(model, "blocks", cfg.rank, cfg.alpha, flavour, generator=cfg.seed + 1)
    svf = SVFExperts(cfg, model, k["blocks"]) if regime.blocks == "svf" else None
    base = model.get_output_embeddings()
    if regime.head == "base":
        head = base
    elif regime.head == "lora" and k["head"] > 1:
        head = LoRAExperts(cfg, base, k["head"], cfg.rank, cfg.alpha, flavour)
    elif regime.head == "lora":
        rank = matched_rank(cfg, model) if regime.matched_rank else cfg.rank
        # "scaled": the alpha whose scaling at this rank equals the rank-cfg.rank LoRA's (the same step size)
        alpha = cfg.alpha * scaling(flavour, 1, cfg.rank) / scaling(flavour, 1, rank) if cfg.matched_alpha == "scaled" \
            else cfg.alpha
        head = LoRA(base, rank, alpha, flavour, generator=cfg.seed)
    else:
        head = ChameleonHead(base, model.get_input_embeddings().embedding_dim, cfg.rank, cfg.alpha, flavour,
                             cfg.hyper_hidden, cfg.hyper_dropout)
    others = (Standardized(head),) if isinstance(head, ChameleonHead) and cfg.cond_norm == "standardize" else ()
    return Adapted(model, head, blocks_adapted=not regime.frozen_body, svf=svf, others=others)
