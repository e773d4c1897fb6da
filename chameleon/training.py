"""Training and evaluation of one regime: AdamW over cluster batches, metrics per epoch, checkpoints.

    result = train(Config.from_profile("smoke", regime="chameleon", protocol="causal"))

A run lives in results/<profile>/<task>/runs/<name>/: config.json, metrics.json / .csv
(train and validation loss and perplexity per epoch, and every eval_every steps) and
checkpoint.safetensors (trainable weights and optimizer state after the last epoch) and
centroids.safetensors (the train split's k-means centroids, for routing at inference).
A finished run with the same configuration is read back instead of retrained; an
interrupted one continues with resume=True and reaches the same final numbers.

Head-only regimes on a frozen body (`cache_body`) compute the body's final hidden states
at the scored positions once and train the head on them: the body runs without dropout
there, which for a frozen body only removes noise (GPT-2's body dropout is 0.1).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from chameleon import objectives
from chameleon.backbones import device as resolve_device, load_backbone
from chameleon.clustering import ClusterBatchSampler
from chameleon.config import Config
from chameleon.embeddings import write_atomic
from chameleon.generation import generation_metrics
from chameleon.data import fingerprint
from chameleon.prepare import Split, prepare
from chameleon.regimes import Adapted, build


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Rows:
    """The scored positions of a split, example-major: rows start[i]:start[i+1] belong to example i."""
    target: torch.Tensor  # (M,) token each row must predict
    start: torch.Tensor  # (N + 1,) offsets
    hidden: torch.Tensor | None = None  # (M, d) body outputs at those rows, when cached

    def index(self, examples: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(self.start[i], self.start[i + 1]) for i in examples])


def scored_rows(adapted: Adapted, split: Split, cache: bool, cache_dir: Path, chunk: int = 16) -> Rows:
    """Targets of the scored positions, and the body's hidden states there if `cache`."""
    scored = split.targets != objectives.IGNORE
    start = torch.zeros(len(split) + 1, dtype=torch.long)
    start[1:] = scored.sum(1).cumsum(0)
    rows = Rows(target=split.targets[scored], start=start)
    if not cache:
        return rows
    # Keyed by content: the model's weights, the tokens, the attention and the targets.
    h = hashlib.sha256()
    for t in (adapted.model.get_input_embeddings().weight[:64], split.input_ids, split.attention, split.targets):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / "hidden" / f"{h.hexdigest()[:20]}.safetensors"
    if path.exists():
        rows.hidden = load_file(path)["hidden"]
        return rows
    dev, parts = next(adapted.parameters()).device, []
    with torch.inference_mode():
        for s in tqdm(range(0, len(split), chunk), desc=f"body hidden states ({split.name})", leave=False):
            ids, attention, target = trimmed(split, list(range(s, min(s + chunk, len(split)))))
            out = adapted.hidden(ids.to(dev), attention.to(dev))
            parts.append(out[(target != objectives.IGNORE).to(dev)].float().cpu())
    rows.hidden = torch.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file({"hidden": rows.hidden}, tmp))
    return rows


def trimmed(split: Split, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, attention and targets of a batch, cut after its last scored position: with causal
    attention later positions never influence it, so the trailing padding of the corrected
    protocol is skipped exactly (the paper protocol scores the last position and keeps all)."""
    target = split.targets[batch]
    scored = (target != objectives.IGNORE).any(0).nonzero()
    end = int(scored.max()) + 1 if len(scored) else 1
    return split.input_ids[batch, :end], split.attention[batch, :end], target[:, :end]


def batch_loss(adapted: Adapted, split: Split, rows: Rows, batch: list[int], cond_batch: list[int],
               dev: torch.device) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's scored positions, and how many there are."""
    idx = rows.index(batch)
    if rows.hidden is not None:
        hidden = rows.hidden[idx].to(dev)
    else:
        ids, attention, target = trimmed(split, batch)
        hidden = adapted.hidden(ids.to(dev), attention.to(dev))[(target != objectives.IGNORE).to(dev)]
    cond = split.cond_emb[cond_batch].mean(0).to(dev) if adapted.conditioned else None
    return objectives.loss_sum(adapted.logits(hidden, cond), rows.target[idx].to(dev)), len(idx)


def condition_batches(batches: list[list[int]], mode: str) -> list[list[int]]:
    """Which examples each batch's conditioning vector averages over: its own, or for the
    `shuffled` control another batch's (half the epoch away, so mostly another cluster)."""
    if mode != "shuffled":
        return batches
    return [batches[(b + len(batches) // 2) % len(batches)] for b in range(len(batches))]


@torch.no_grad()
def evaluate(adapted: Adapted, split: Split, rows: Rows, cfg: Config, dev: torch.device) -> dict:
    """Validation loss (token-weighted mean cross-entropy) and perplexity (exp of it)."""
    adapted.eval()
    batches = list(ClusterBatchSampler(split.labels, cfg.batch_size, seed=0))
    total, count = 0.0, 0
    for batch, cond in zip(batches, condition_batches(batches, cfg.conditioning)):
        loss, n = batch_loss(adapted, split, rows, batch, cond, dev)
        total, count = total + loss.item(), count + n
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}


def run_name(cfg: Config) -> str:
    """regime-protocol-conditioning-seed, and a hash of everything that changes the result."""
    source = fingerprint(cfg.corpus if cfg.task == "lm" else cfg.instructions)
    key = {**cfg.to_dict(), "data": source, "results_dir": None, "device": None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.regime}-{cfg.protocol}-{cfg.conditioning}-seed{cfg.seed}-{digest}"


def run_dir(cfg: Config) -> Path:
    return Path(cfg.results_dir) / cfg.profile / cfg.task / "runs" / run_name(cfg)


def train(cfg: Config, model=None, tokenizer=None, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg.regime under cfg.protocol; returns the run's metrics (also written to its folder).

    Args:
        cfg: the configuration; its seed reproduces the run.
        model, tokenizer: a backbone already loaded (it is modified: frozen, adapters added);
            None loads cfg.backbone.
        resume: continue an interrupted run from its last epoch checkpoint.
        progress: show tqdm progress bars.
    """
    out = run_dir(cfg)
    done = out / "metrics.json"
    if done.exists() and json.loads(done.read_text()).get("finished"):
        return json.loads(done.read_text())
    if out.exists() and not resume:
        print(f"{out.name}: an unfinished run is there; starting it over (pass resume=True / --resume to continue it)")
    if model is None:
        model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    dev = resolve_device(cfg.device)
    train_split, val_split, centroids = prepare(cfg, model, tokenizer)
    adapted = build(cfg, model).to(dev)
    cache = cfg.cache_body and not adapted.blocks_adapted
    rows = {s.name: scored_rows(adapted, s, cache, cfg.cache_dir) for s in (train_split, val_split)}
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    # the train split's k-means centroids: serving routes new prompts to them (serving.Adapter)
    save_file({"centroids": torch.from_numpy(centroids).contiguous()}, out / "centroids.safetensors")

    history, start_epoch, step, seconds = [], 0, 0, 0.0
    if resume and (out / "checkpoint.json").exists():
        history, start_epoch, step, seconds = _load_checkpoint(out, adapted, opt)
    if not history:
        history.append({"epoch": 0, "step": 0, "train_loss": None, **evaluate(adapted, val_split, rows["validation"], cfg, dev)})
    sampler = ClusterBatchSampler(train_split.labels, cfg.batch_size, seed=cfg.seed)
    for epoch in range(start_epoch, cfg.epochs if params else 0):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: an epoch replays identically after a resume
        sampler.set_epoch(epoch)
        batches = list(sampler)
        adapted.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(zip(batches, condition_batches(batches, cfg.conditioning)), total=len(batches),
                   desc=f"{cfg.regime}/{cfg.protocol} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i, (batch, cond) in enumerate(bar):
            loss_sum, n = batch_loss(adapted, train_split, rows["train"], batch, cond, dev)
            loss = loss_sum / max(n, 1)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} (batch {i} of the "
                                       f"epoch, examples {batch[:8]}...); lower lr (now {cfg.lr}). The last good "
                                       f"checkpoint is kept in {out}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total, count = total + loss_sum.item(), count + n
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.eval_every and step % cfg.eval_every == 0:
                history.append({"epoch": epoch + i / len(batches), "step": step, "train_loss": loss.item(),
                                **evaluate(adapted, val_split, rows["validation"], cfg, dev)})
                adapted.train()
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "step": step, "train_loss": total / max(count, 1),
                        **evaluate(adapted, val_split, rows["validation"], cfg, dev)})
        _save_checkpoint(out, adapted, opt, history, epoch + 1, step, seconds)
    result = {"config": cfg.to_dict(), "trainable_params": adapted.trainable(), "history": history,
              "val_loss": history[-1]["val_loss"], "val_ppl": history[-1]["val_ppl"],
              "seconds": round(seconds, 2), "finished": True}
    if cfg.task == "instructions":  # BLEU / ROUGE-L / METEOR of greedy outputs on the first n_generate examples
        result.update(generation_metrics(adapted, val_split, cfg, tokenizer))
    _write_metrics(out, result)
    return result


def _write_metrics(out: Path, result: dict) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train_loss", "val_loss", "val_ppl"])
        writer.writeheader()
        writer.writerows(result["history"])
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


def _save_checkpoint(out: Path, adapted: Adapted, opt, history, epoch: int, step: int, seconds: float) -> None:
    """Trainable weights and AdamW state as safetensors, the rest as JSON (no pickle)."""
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in adapted.named_parameters() if p.requires_grad}
    state = opt.state_dict()
    for i, s in state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().cpu().reshape(v.shape).contiguous() for k, v in s.items()})
    meta = {"epoch": epoch, "step": step, "seconds": seconds, "history": history, "param_groups": state["param_groups"]}
    write_atomic(out / "checkpoint.safetensors", lambda tmp: save_file(tensors, tmp))
    write_atomic(out / "checkpoint.json", lambda tmp: Path(tmp).write_text(json.dumps(meta) + "\n"))


def _load_checkpoint(out: Path, adapted: Adapted, opt):
    tensors, meta = load_file(out / "checkpoint.safetensors"), json.loads((out / "checkpoint.json").read_text())
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("param."):
                params[name[len("param."):]].copy_(value)
    state = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["history"], meta["epoch"], meta["step"], meta["seconds"]

