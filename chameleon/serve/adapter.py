"""Inference-time adaptation as an API: a trained run answers batches of prompts, one adapter per group.

    adapter = Adapter.from_run("results/smoke/lm/runs/chameleon-causal-batch_mean-seed0-1a2b3c4d")
    for r in adapter.generate(["The history of Rome", "Photosynthesis is"], max_new_tokens=32, group="route"):
        print(r.group, r.text)

This is the paper's inference-time clustering made usable. Each prompt is embedded as in
training (`embeddings.mean_embeddings` of its tokens under the run's protocol's mask; the
prompt alone, never an answer), the batch is split into groups, and a ChameleonLLM head
applies one generated LoRA update per group. The groupings are the batchings of evaluation
(`regimes.BATCHINGS`), under serving's words for them (`regimes.GROUP_WORDS`; a batching's own name works too):

- `route` (`clustered`): each prompt goes to its nearest training centroid (`clustering.assign`), as
  `prepare` routes validation examples; prompts of one cluster form a group.
- `kmeans`: the incoming batch is clustered by itself (k = ceil(n / cfg.batch_size), or
  `n_groups`): the paper's inference-time clusters.
- `single` (`mixed`): the whole batch is one group (the paper's "one adapter per batch").

A group's conditioning vector is the mean of its prompts' embeddings, the same rule as
`training.batch_loss` (the batch mean of the members' embeddings), not the training
centroid: a centroid averages training texts and, under `batch_mean` conditioning, their
continuations too. Under `prefix` conditioning only the first cfg.prefix_tokens prompt
tokens count, as in training; `shuffled` (a training control) is served with the group's
own vector. Experts regimes (`lora_experts`, `svf_experts`) pick each group's expert as evaluation
does under the `classifier` dispatch: the group centroid nearest the group's mean prompt embedding
(the first cfg.prefix_tokens tokens of a line, or an instruction's prompt), with the prompt centroids
stored in the run folder. `oracle` and `cem` read the true group of a validation batch, which a
served prompt does not have: load such a run with dispatch="classifier" (the experts are the same).
LoRA experts differ in the head alone, so a mixed batch decodes together with one expert per group;
SVF experts change the body, so their batch is decoded group by group. Other regimes (`unadapted`,
`lora`, ...) ignore the groups.

With sampling arguments (`generate(..., do_sample=True, top_p=0.9)`, stop_strings, a streamer) the same batch
decodes through Hugging Face's `generate` on `hf_model`, a `PreTrainedModel` whose head is this batch's grouped
head (`chameleon.serve.hf`). Without them, decoding is the kit's batched greedy decoding
(`generation.batched_greedy`, the same tokens as do_sample=False): left-padded prompts, position ids
counted over real tokens, the body's KV cache, ONE body forward per step for the whole
batch, EOS stops a row (finished rows are fed padding and their output is dropped). The
head computes the hypernetwork once per group per request, not per row or per step; rows
are sorted by group so that each group is a contiguous segment, and each segment adds its
own rank-r update in place (the segmented form of Punica's BGMV / S-LoRA kernels: no
per-row gather of A and B, no (n, vocab, r) temporary). The order of the results is the
order of the prompts.

Centroids: `training.train` stores the k-means centroids of the train split in the run
folder (centroids.safetensors). For runs trained before that, `from_run` recomputes them
with `prepare.prepare` from the run's config: the same data subset and a seeded k-means,
hence the same centroids (it reads the data and embeds the train split: seconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chameleon.backbones import device as resolve_device, load_backbone
from chameleon.clustering import assign, kmeans
from chameleon.config import Config
from chameleon.embeddings import embedding_mask, mean_embeddings
from chameleon.serve.decoding import batched_greedy, tokenize_prompts, until_eos
from chameleon.serve.hf import HFAdapted, hf_inputs
from chameleon.adapters.model import Adapted
from chameleon.prepare import prepare, prompt_prefix
from chameleon.regimes import CONDITIONINGS, DISPATCHES, LEVELS, grouping
from chameleon.runs import load_trained, read_centroids, read_config

@dataclass
class Result:
    prompt: str
    text: str  # the decoded answer, special tokens skipped, stripped
    tokens: list[int]  # the new token ids, EOS excluded
    group: int  # route (clustered): the training cluster; kmeans: the cluster within this batch; single (mixed): 0
    group_size: int  # prompts of this batch in the same group (they share one adapter)
    stopped: bool  # True when the model chose EOS, False when max_new_tokens ran out
    expert: int | None = None  # experts regimes: the expert its group was dispatched to


def prompt_embeddings(model, tokenizer, prompts: list[str], cfg: Config, prefix: int | None = None) -> torch.Tensor:
    """(N, d) mean input embedding of each prompt, as `prepare` embeds a text: its tokens (here the
    last cfg.max_length, those decoded from) right-padded to cfg.max_length, averaged under the
    protocol's mask (`authors`: padding included; `causal`: real tokens), L2-normalised.

    Args:
        prefix: count only the first `prefix` tokens (`prefix` conditioning).
    """
    L = cfg.max_length
    dev = model.get_input_embeddings().weight.device
    ids = torch.full((len(prompts), L), tokenizer.pad_token_id, dtype=torch.long, device=dev)
    real = torch.zeros((len(prompts), L), dtype=torch.long, device=dev)
    for i, p in enumerate(tokenize_prompts(tokenizer, prompts, L)):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        real[i, :len(p)] = 1
    mask = embedding_mask(real, cfg.protocol)
    if prefix is not None:
        mask = mask * (torch.arange(L, device=dev) < prefix)
    return mean_embeddings(model, ids, mask)


class Adapter:
    """A trained run ready to answer prompts: backbone + adapters + the training centroids."""

    def __init__(self, adapted: Adapted, tokenizer, cfg: Config, centroids: np.ndarray | None = None,
                 run: Path | None = None, cache_dir: Path | None = None):
        self.adapted, self.tokenizer, self.cfg = adapted.eval(), tokenizer, cfg
        self.centroids = centroids
        self.run, self.cache_dir = run, cache_dir  # where it was loaded from (export reloads the bare backbone)
        self.device = next(adapted.parameters()).device

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", cache_dir: str | Path | None = None,
                 dispatch: str | None = None) -> "Adapter":
        """Load a finished training run (a folder written by `training.train`).

        Args:
            run_dir: the run folder (config.json, metrics.json, checkpoint.safetensors).
            device: "auto" (CUDA when present), "cpu" or "cuda".
            cache_dir: where the converted backbone lives; None: the run's cfg.cache_dir if it
                holds the backbone, else the checkout's data/cache.
            dispatch: experts regimes: serve under this dispatch instead of the run's ("classifier" serves
                an `oracle` run's experts; the experts are the same, see runs.trained_by).
        """
        run = Path(run_dir)
        if not run.is_dir():
            raise ValueError(f"{run} is not a run folder; pass a folder under results/<profile>/<task>/runs/ "
                             f"(`python -m chameleon train` prints it)")
        cfg = read_config(run)
        cfg = cfg if dispatch is None else cfg.replace(dispatch=dispatch)
        cache_dir = _backbone_cache(cfg, cache_dir)
        model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cache_dir)
        adapted = load_trained(cfg, model, run).to(resolve_device(device))
        stored = read_centroids(run)
        experts = adapted.experts
        if "centroids" not in stored or (experts is not None and experts.k > 1 and experts.prompt_centroids is None):
            # a run of an older kit: k-means is seeded, so prepare and bind give what training computed
            train_split, val_split, centroids = prepare(cfg, adapted.model, tokenizer)
            adapted.bind(train_split, val_split)
        else:
            centroids = stored["centroids"].numpy()
        return cls(adapted, tokenizer, cfg, centroids, run, cache_dir)

    def embed(self, prompts: list[str], prefix: int | None = None) -> torch.Tensor:
        """(N, d) CPU float32: the prompts' mean embeddings under the run's protocol (see `prompt_embeddings`)."""
        return prompt_embeddings(self.adapted.model, self.tokenizer, prompts, self.cfg, prefix)

    @property
    def per_line(self) -> bool:
        """The run adapts to each line alone (regimes.LEVELS, a per-line dispatch): every prompt is its own group,
        whatever grouping is asked for."""
        return ((self.adapted.conditioned and LEVELS[self.cfg.cond_level].evaluates_per_line)
                or (self.adapted.experts is not None and DISPATCHES[self.cfg.dispatch].per_line))

    def assign_groups(self, emb: torch.Tensor, group: str = "route", n_groups: int | None = None) -> np.ndarray:
        """(N,) group of each embedding under `group` (regimes.GROUPINGS: "route", "kmeans" or "single")."""
        n, batching = len(emb), grouping(group)
        if batching.routed and n:
            if self.centroids is None:
                raise ValueError(f"group={group!r} needs the training centroids, and this adapter has none; "
                                 "use group='kmeans' or 'single'")
            return assign(emb, self.centroids)
        if batching.grouped and n:
            k = n_groups or math.ceil(n / self.cfg.batch_size)
            if not 1 <= k:
                raise ValueError(f"n_groups must be a positive integer, got {n_groups}")
            return np.zeros(n, dtype=np.int64) if min(k, n) == 1 else kmeans(emb, min(k, n), self.cfg.seed)[0]
        return np.zeros(n, dtype=np.int64)  # one group: the whole batch

    def conditions(self, prompts: list[str], labels: np.ndarray, emb: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Each group's conditioning vector: the mean of its prompts' conditioning embeddings."""
        prefix = self.cfg.prefix_tokens if CONDITIONINGS[self.cfg.conditioning].prefix else None
        if emb is None or prefix != self.cfg.route_prefix:
            emb = self.embed(prompts, prefix)
        return {int(g): emb[torch.from_numpy(labels == g)].mean(0) for g in np.unique(labels)}

    def plan(self, prompts: list[str], group: str = "route", n_groups: int | None = None) -> "Batch":
        """How a batch of prompts decodes: each prompt's group, each group's conditioning vector and expert."""
        grouping(group)  # a bad word is refused before any work
        if why := self.adapted.unservable():
            raise ValueError(f"{self.cfg.regime} cannot be served as loaded: {why}")
        emb = self.embed(prompts, self.cfg.route_prefix)
        labels = np.arange(len(prompts)) if self.per_line else self.assign_groups(emb, group, n_groups)
        conds = self.conditions(prompts, labels, emb)
        keys = list(conds)  # the groups present, relabelled 0..G-1 for the decoder
        index = {g: i for i, g in enumerate(keys)}
        experts = self.adapted.experts
        selections = None
        if experts is not None:  # each group's expert, as the classifier dispatch picks a validation batch's
            dispatch_emb = self.embed(prompts, prompt_prefix(self.cfg))
            selections = [experts.choose(dispatch_emb[torch.from_numpy(labels == g)]) for g in keys]
        stacked = torch.stack([conds[g] for g in keys]).to(self.device) if self.adapted.conditioned else None
        return Batch(tokenize_prompts(self.tokenizer, prompts, self.cfg.max_length), labels,
                     [index[int(g)] for g in labels], stacked, selections)

    def hf_model(self, prompts: list[str], group: str = "route", n_groups: int | None = None) -> tuple[HFAdapted, dict]:
        """A Hugging Face model whose head is this batch's grouped head, and generate's inputs for `prompts`:
        `model.generate(**inputs, do_sample=True, top_p=0.9, ...)` (see `chameleon.serve.hf`)."""
        batch = self.plan(prompts, group, n_groups)
        model = HFAdapted(self.adapted, batch.conds, batch.selections, len(batch.keys), self.tokenizer)
        return model, hf_inputs(batch.prompt_ids, batch.groups, self.tokenizer.pad_token_id, self.device)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, group: str = "route",
                 n_groups: int | None = None, ignore_eos: bool = False, **sampling) -> list[Result]:
        """Answers to `prompts`, decoded as one batch with one adapter per group.

        Args:
            prompts: the texts to continue (for an instruction run: the paper's prompt format,
                `instructions.prompt(instruction, input)`).
            max_new_tokens: at most this many new tokens each (None: the run's cfg.max_new_tokens).
            group: "route", "kmeans" or "single", or a batching's own name (regimes.GROUPINGS; see the module
                docstring).
            n_groups: k of "kmeans" (None: ceil(len(prompts) / cfg.batch_size)).
            ignore_eos: decode max_new_tokens for every prompt (benchmarks: equal work per variant).
            sampling: Hugging Face `generate` arguments (do_sample, temperature, top_p, top_k, stop_strings,
                streamer, ...): the batch then decodes through `hf_model`; without them, by the kit's batched
                greedy decoding (the same tokens as do_sample=False, faster).
        """
        max_new_tokens = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            return []
        batch = self.plan(prompts, group, n_groups)
        eos = None if ignore_eos else self.tokenizer.eos_token_id
        if self.adapted.body_per_group:  # the body differs per expert: one decoding batch per group
            parts = [[i for i, g in enumerate(batch.groups) if g == j] for j in range(len(batch.keys))]
        else:
            parts = [list(range(len(prompts)))]
        tokens: list[list[int]] = [[] for _ in prompts]
        for rows in parts:
            for i, t in zip(rows, self._decode(batch, rows, max_new_tokens, eos, sampling)):
                tokens[i] = t
        sizes = np.bincount(batch.labels)
        return [Result(prompt=p, text=self.tokenizer.decode(t, skip_special_tokens=True).strip(), tokens=t,
                       group=int(g), group_size=int(sizes[g]), stopped=eos is not None and len(t) < max_new_tokens,
                       expert=None if batch.selections is None else batch.selections[j])
                for p, t, g, j in zip(prompts, tokens, batch.labels, batch.groups)]

    def _decode(self, batch: "Batch", rows: list[int], max_new_tokens: int, eos: int | None, sampling: dict):
        """The new tokens of the prompts `rows` of `batch`, EOS excluded."""
        keys = sorted({batch.groups[i] for i in rows})
        local = {g: j for j, g in enumerate(keys)}
        prompt_ids, groups = [batch.prompt_ids[i] for i in rows], [local[batch.groups[i]] for i in rows]
        conds = None if batch.conds is None else batch.conds[keys]
        selections = None if batch.selections is None else [batch.selections[g] for g in keys]
        pad = self.tokenizer.pad_token_id
        if self.adapted.body_per_group:  # one group's rows: its expert is the body's
            self.adapted.route_to(selections[0])
        if not sampling:
            return batched_greedy(self.adapted, prompt_ids, max_new_tokens, eos, pad, conds, groups, selections)
        if sampling.get("num_return_sequences", 1) != 1:
            raise ValueError("Adapter.generate returns one answer per prompt; for num_return_sequences > 1 call "
                             "model, inputs = adapter.hf_model(prompts) and model.generate(**inputs, ...)")
        model = HFAdapted(self.adapted, conds, selections, len(keys), self.tokenizer)
        inputs = hf_inputs(prompt_ids, groups, pad, self.device)
        extra = {"tokenizer": self.tokenizer} if "stop_strings" in sampling else {}
        if eos is None:
            extra["min_new_tokens"] = max_new_tokens
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra, **{"do_sample": False, **sampling})
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        new = [until_eos(t, self.tokenizer.eos_token_id) for t in new]
        if pad != self.tokenizer.eos_token_id:  # a row stopped by a stop string is filled with padding
            new = [t[:max((k + 1 for k, x in enumerate(t) if x != pad), default=0)] for t in new]
        return new

    def export_peft(self, out: str | Path, force: bool = False) -> Path:
        """Write the run as PEFT LoRA adapters that load without the kit (see `chameleon.serve.export`)."""
        from chameleon.serve.export import export_peft

        return export_peft(self, out, force)

    def adapter_bytes(self) -> dict[str, int]:
        """Memory of the adapters: bytes of the trained tensors (LoRA's A and B; for `chameleon` the
        hypernetwork), and of the A and B generated for one group (`chameleon` only)."""
        trained = sum(p.numel() * p.element_size() for p in self.adapted.parameters() if p.requires_grad)
        per_group = 0
        if self.adapted.conditioned:
            h = self.adapted.head.hyper
            per_group = h.rank * (h.d_in + h.d_out) * self.adapted.head.base.weight.element_size()
        return {"trained": trained, "per_group": per_group}


@dataclass
class Batch:
    """A batch of prompts as `Adapter.plan` lays it out for decoding."""
    prompt_ids: list[list[int]]  # each prompt's tokens (its last cfg.max_length)
    labels: np.ndarray  # (N,) each prompt's group as Result reports it (route: the training cluster)
    groups: list[int]  # each prompt's group relabelled 0..G-1, the decoder's index
    conds: torch.Tensor | None  # (G, d) each group's conditioning vector (ChameleonLLM heads)
    selections: list | None  # each group's expert (experts regimes)

    @property
    def keys(self) -> range:
        return range(max(self.groups) + 1)


def _backbone_cache(cfg: Config, cache_dir) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir)
    return cfg.cache_dir if (cfg.cache_dir / "models").is_dir() else None
