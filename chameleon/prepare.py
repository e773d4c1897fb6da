"""corpus -> tokens -> embeddings -> clusters: everything a run needs before training.

`prepare(cfg, model, tokenizer)` returns the train and validation `Split`s: fixed-length
tokens, protocol targets, the embedding each example is clustered by, the embedding the
hypernetwork is conditioned on, and each example's cluster. Validation examples are routed
to the nearest train centroid, as a batch arriving at inference time would be (the
authors cluster validation separately).
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from chameleon import instructions, objectives
from chameleon.cache import cached
from chameleon.clustering import assign, default_k, kmeans
from chameleon.config import Config
from chameleon.data import carve_dev, load_instructions, load_lm_corpus, subsample, tokenize
from chameleon.embeddings import embedding_mask, mean_embeddings
from chameleon.regimes import CONDITIONINGS, REGIMES


@dataclass
class Split:
    name: str  # "train" or "validation"
    texts: list[str]  # what the backbone reads (for instructions: prompt + response)
    input_ids: torch.Tensor  # (N, L) right-padded
    attention: torch.Tensor  # (N, L) what the backbone attends to (see objectives.attention_mask)
    targets: torch.Tensor  # (N, L) token to predict at each position, -100 where not scored
    cluster_emb: torch.Tensor  # (N, d) the embedding k-means sees
    cond_emb: torch.Tensor  # (N, d) the embedding the hypernetwork's batch mean is taken over
    labels: np.ndarray  # (N,) cluster of each example
    prompt_emb: torch.Tensor | None = None  # (N, d) what an SVF expert dispatch classifies (svf_experts only): the
    # prompt's embedding (instructions) or the first prefix_tokens tokens' (lm)
    pad_id: int | None = None  # the tokenizer's pad token: under "authors" a padded example's target (evaluate splits by it)
    domains: np.ndarray | None = None  # (N,) each example's domain, where the corpus labels them: read only by the
    # oracle controls (Conditioning.pool "domain", Config.expert_groups "domain") and the per-domain tables
    group_emb: torch.Tensor | None = None  # (N, d) what an incoming batch is grouped by at inference (regimes.BATCHINGS):
    # the conditioning's own embedding before pooling, the prompt's for experts, the prefix's under route_by "prefix"
    cond_own: torch.Tensor | None = None  # (N, d) each example's own conditioning vector before pooling: what
    # Config.cond_norm's statistics are taken over

    def __len__(self) -> int:
        return len(self.input_ids)


def load_split_texts(cfg: Config, split: str, tokenizer=None) -> dict:
    """The texts of one split, subsampled by cfg.data_seed (fixed across --seeds); with a
    tokenizer, without the examples that have nothing to predict (see `drop_short`)."""
    n = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    if cfg.task == "lm":
        corpus = load_lm_corpus(cfg.corpus)
        source = carve_dev(corpus["train"], split, cfg.dev_key) if cfg.dev_split else corpus[split]
        ds = subsample(source, n, cfg.data_seed)
        texts = {"full": list(ds["text"]), **({"domain": list(ds["domain"])} if "domain" in ds.column_names else {})}
    else:
        ds = subsample(load_instructions(cfg.instructions)[split], n, cfg.data_seed)
        texts = instructions.texts(list(ds))
    return texts if tokenizer is None else drop_short(texts, tokenizer, cfg, split)


def drop_short(texts: dict, tokenizer, cfg: Config, split: str) -> dict:
    """`texts` without the examples of fewer than 2 tokens (a one-word line, a lone "="): no
    next token to predict. They are dropped with a notice, as the instruction loader drops
    empty records, rather than refusing the corpus; every list of `texts` stays aligned."""
    lengths = [len(ids) for ids in tokenizer(texts["full"], truncation=True, max_length=2)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n >= 2]
    if len(keep) == len(lengths):
        return texts
    short = next(t for t, n in zip(texts["full"], lengths) if n < 2)
    source = cfg.corpus if cfg.task == "lm" else cfg.instructions
    warnings.warn(f"{source} ({split} split): dropped {len(lengths) - len(keep)} of {len(lengths)} examples with "
                  f"fewer than 2 tokens (e.g. {short!r}): nothing to predict there", stacklevel=2)
    return {name: [values[i] for i in keep] for name, values in texts.items()}


def prepare(cfg: Config, model, tokenizer, raw: dict | None = None) -> tuple[Split, Split, np.ndarray]:
    """Train and validation splits and the k-means centroids (k, d) of the train split.

    Args:
        raw: {"train": ..., "validation": ...} from `load_split_texts`, when the caller has
            loaded them already (train() does, so corpus errors come before the model loads).
    """
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:
        raise ValueError(f"max_length={cfg.max_length} exceeds the {positions} positions of backbone "
                         f"{cfg.backbone!r}; lower max_length to {positions} or less")
    raw = raw or {s: load_split_texts(cfg, s) for s in ("train", "validation")}
    raw = {s: drop_short(texts, tokenizer, cfg, s) for s, texts in raw.items()}
    if cfg.batch_size > len(raw["train"]["full"]):
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(raw['train']['full'])} training examples; "
                         f"lower batch_size or raise max_train_examples")
    for s, texts in raw.items():
        if len(texts["full"]) < 2 * cfg.batch_size:  # one or two batches: a loss too noisy to compare runs by
            warnings.warn(f"the {s} split has only {len(texts['full'])} examples, fewer than 2 batches of "
                          f"{cfg.batch_size}; its numbers will be noisy (give more data or lower batch_size)",
                          stacklevel=2)
    parts = {s: _encode(cfg, model, tokenizer, s, texts) for s, texts in raw.items()}
    domains = {s: np.array(texts["domain"]) if "domain" in texts else None for s, texts in raw.items()}
    pool, train_own = CONDITIONINGS[cfg.conditioning].pool, parts["train"]["cond_emb"]
    for s, part in parts.items():
        part["group_emb"] = next(e for e in (part["route_emb"], part["prompt_emb"], part["cond_emb"]) if e is not None)
        part["cond_own"] = part["cond_emb"]
        part["cond_emb"] = pooled(train_own, domains["train"], part["cond_emb"], domains[s], pool, s)
    route = {s: part.pop("route_emb") for s, part in parts.items()}
    k = cfg.n_clusters or default_k(len(parts["train"]["input_ids"]), cfg.batch_size)
    train_labels, centroids = kmeans(parts["train"]["cluster_emb"], k, cfg.seed)
    if cfg.routes_by_prefix:  # validation lines meet the training clusters through what they show first
        centroids = member_means(route["train"], train_labels, k)
    by = route["validation"] if cfg.routes_by_prefix else parts["validation"]["cluster_emb"]
    labels = {"train": train_labels, "validation": assign(by, centroids)}
    splits = [Split(name=s, texts=raw[s]["full"], labels=labels[s], pad_id=tokenizer.pad_token_id, domains=domains[s],
                    **parts[s])
              for s in ("train", "validation")]
    return splits[0], splits[1], centroids


def member_means(emb: torch.Tensor, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) the mean of each cluster's members' embeddings (Config.route_by "prefix": the prefix centroids)."""
    return np.stack([emb[torch.from_numpy(labels == c)].mean(0).numpy() for c in range(k)]).astype(np.float32)


def pooled(train_emb: torch.Tensor, train_domains: np.ndarray | None, emb: torch.Tensor,
           domains: np.ndarray | None, pool: str, split: str = "validation") -> torch.Tensor:
    """Each example's conditioning embedding under a conditioning's `pool` (regimes.Conditioning, one of POOLS): its
    own ("example"), the training split's mean ("all"), its true domain's training mean ("domain"), or its true
    domain's code ("code"; "code_permuted": on the validation split, the code of the next domain in sorted order,
    so that no domain keeps its own), so that a batch's mean is that of the pooled vectors of its members."""
    return POOLS[pool](train_emb, train_domains, emb, domains, split)


def _own(train_emb, train_domains, emb, domains, split) -> torch.Tensor:
    return emb


def _training_mean(train_emb, train_domains, emb, domains, split) -> torch.Tensor:
    return train_emb.mean(0).expand_as(emb).clone()


def _domain_names(train_domains: np.ndarray | None, domains: np.ndarray | None) -> list:
    """The training split's domains, sorted; refused where a split has no domains or one without training lines."""
    if domains is None or train_domains is None:
        raise ValueError("the oracle conditionings read each example's domain, and this corpus has none; use "
                         "--corpus domains or a JSONL corpus with a \"domain\" field on every line")
    names = sorted(set(train_domains))
    if missing := sorted(set(domains) - set(names)):
        raise ValueError(f"domain(s) {missing} have no training example to take a mean over; give each domain "
                         "training lines")
    return names


def _domain_mean(train_emb, train_domains, emb, domains, split) -> torch.Tensor:
    names = _domain_names(train_domains, domains)
    means = {d: train_emb[torch.from_numpy(train_domains == d)].mean(0) for d in names}
    return torch.stack([means[d] for d in domains])


def _domain_code(train_emb, train_domains, emb, domains, split, permuted: bool = False) -> torch.Tensor:
    names = _domain_names(train_domains, domains)
    codes = dict(zip(names, domain_codes(train_emb, len(names))))
    if permuted and split != "train":
        codes = {d: codes[names[(i + 1) % len(names)]] for i, d in enumerate(names)}
    return torch.stack([codes[d] for d in domains])


# What each value of Conditioning.pool computes: (train_emb, train_domains, emb, domains, split) -> (N, d). A new
# kind of pooling is one entry here.
POOLS = {"example": _own, "all": _training_mean, "domain": _domain_mean, "code": _domain_code,
         "code_permuted": functools.partial(_domain_code, permuted=True)}


CODE_SEED = 20260  # the oracle_separable codes are the same in every run: a property of the corpus, not of a seed


def domain_codes(train_emb: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d) fixed random codes, one per domain: mean + std * N(0, I) with the per-dimension mean and std of the
    per-line training vectors, so that codes differ from each other as two random lines do, in the same units."""
    g = torch.Generator().manual_seed(CODE_SEED)
    noise = torch.randn(n, train_emb.shape[1], generator=g, dtype=torch.float64)
    return (train_emb.double().mean(0) + train_emb.double().std(0) * noise).to(train_emb.dtype)


def prompt_prefix(cfg: Config) -> int | None:
    """How much of a text the experts' classifier dispatch reads: an instruction's whole prompt (None),
    or the first cfg.prefix_tokens tokens of a line (a language-modelling text has no separate prompt)."""
    return None if cfg.task == "instructions" else cfg.prefix_tokens


def _encode(cfg: Config, model, tokenizer, split: str, texts: dict) -> dict:
    if "prompt" in texts:  # instructions: the response ends in EOS, so a tuned model learns to stop
        texts = {**texts, "full": [t + tokenizer.eos_token for t in texts["full"]]}
    enc = tokenize(texts["full"], tokenizer, cfg.max_length)
    ids, real = enc["input_ids"], enc["attention_mask"]
    # instructions: the loss is taken on the response tokens alone
    loss_from = instructions.response_start(texts["prompt"], tokenizer) if "prompt" in texts else None
    conditioning = CONDITIONINGS[cfg.conditioning]  # read by every regime: a `prefix` run's baselines score alike
    # a `prefix` conditioning's tokens are seen by the hypernetwork, so never scored; score_from scores every
    # regime on the same tokens as a `prefix` run with prefix_tokens = score_from
    for start in (cfg.prefix_tokens if conditioning.prefix else 0, cfg.score_from):
        if start:
            loss_from = torch.full((len(ids),), start) if loss_from is None else loss_from.clamp(min=start)
    target = objectives.targets(ids, real, cfg.protocol, loss_from)
    key = dict(backbone=cfg.backbone, task=cfg.task, data=cfg.corpus if cfg.task == "lm" else cfg.instructions,
               split=split, n=len(ids), data_seed=cfg.data_seed, max_length=cfg.max_length, protocol=cfg.protocol,
               texts=hashlib.sha256("\0".join(texts["full"]).encode()).hexdigest()[:16])

    def embed(kind: str, text_key: str, prefix: int | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
        def compute():
            e = tokenize(texts[text_key], tokenizer, cfg.max_length) if text_key != "full" else enc
            mask = embedding_mask(e["attention_mask"], cfg.protocol)
            if prefix is not None:
                mask = mask * (torch.arange(mask.shape[1]) < prefix)
            if exclude is not None:
                mask = mask * ~exclude
            return mean_embeddings(model, e["input_ids"], mask)
        width = model.get_input_embeddings().weight.shape[1]
        return cached({**key, "kind": kind}, cfg.cache_dir / "embeddings", compute, expect_shape=(len(ids), width))

    cluster_key = "prompt" if "prompt" in texts else "full"
    text = conditioning.text_key(cluster_key)
    if conditioning.prefix:
        cond_emb = embed(f"prefix{cfg.prefix_tokens}", text, cfg.prefix_tokens)
    elif conditioning.exclude_targets:
        cond_emb = embed(f"excl{int(loss_from[0]) if loss_from is not None else 0}", text,
                         exclude=objectives.target_tokens(target, cfg.protocol))
    else:
        cond_emb = embed(text, text)
    prompt_emb = None
    if REGIMES[cfg.regime].experts:  # what the classifier dispatch reads: never the continuation
        prefix = prompt_prefix(cfg)
        prompt_emb = embed(f"prefix{prefix}" if prefix else cluster_key, cluster_key, prefix)
    route_emb = embed(f"prefix{cfg.prefix_tokens}", cluster_key, cfg.prefix_tokens) if cfg.routes_by_prefix else None
    return dict(input_ids=ids, attention=objectives.attention_mask(ids, real, cfg.protocol), prompt_emb=prompt_emb,
                targets=target, route_emb=route_emb,
                cluster_emb=embed(cluster_key, cluster_key), cond_emb=cond_emb)


def trimmed(split: Split, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, attention and targets of a batch, cut after its last scored position: with causal
    attention later positions never influence it, so the trailing padding of the corrected
    protocol is skipped exactly (the authors' protocol scores the last position and keeps all)."""
    target = split.targets[batch]
    scored = (target != objectives.IGNORE).any(0).nonzero()
    end = int(scored.max()) + 1 if len(scored) else 1
    return split.input_ids[batch, :end], split.attention[batch, :end], target[:, :end]
