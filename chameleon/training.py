"""Training and evaluation of one regime: AdamW over cluster batches, metrics per epoch, checkpoints.

    result = train(Config.from_profile("smoke", regime="chameleon", protocol="causal"))

A run lives in results/<profile>/<task>/runs/<name>/: config.json, metrics.json / .csv
(train and validation loss and perplexity per epoch, and every eval_every steps) and
checkpoint.safetensors (trainable weights and optimizer state after the last epoch, with the
epoch, step and history in its metadata), centroids.safetensors (the train split's k-means
centroids, for routing at inference) and, when cfg.batchings names any, lines.csv (every
validation line's loss under each way of batching it).
A finished run with the same configuration is read back instead of retrained; an
interrupted one continues with resume=True and reaches the same final numbers.

Head-only regimes on a frozen body (`cache_body`) compute the body's final hidden states
at the scored positions once and train the head on them: the body runs without dropout
there, which for a frozen body only removes noise (GPT-2's body dropout is 0.1).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from chameleon import objectives, parallel
from chameleon.backbones import load_backbone
from chameleon.cache import RowFile, cached_rows, write_atomic
from chameleon.clustering import ClusterBatchSampler, condition_batches, eval_batches, incoming_batches
from chameleon.config import Config, RunFailed
from chameleon.serve.metrics import generation_metrics
from chameleon.adapters.model import Adapted, build
from chameleon.prepare import Split, load_split_texts, prepare, trimmed
from chameleon.regimes import LEVELS, OBJECTIVES, PROTOCOLS
from chameleon.runs import (CHECKPOINT, EVAL_METRICS, LINES, finished, load_checkpoint, load_weights, read_checkpoint, run_dir,
                            save_centroids, save_checkpoint, trained_by, write_metrics)



class TrainingDiverged(RunFailed):
    """The training loss became NaN or infinite, or the validation loss blew up (see
    `_check_val_loss`); the last good checkpoint is kept and no result is written."""


@dataclass
class Rows:
    """The scored positions of a split, example-major: rows start[i]:start[i+1] belong to example i."""
    target: torch.Tensor  # (M,) token each row must predict
    start: torch.Tensor  # (N + 1,) offsets
    hidden: RowFile | None = None  # (M, d) body outputs at those rows, when cached (read by rows)

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

    def chunks():  # written to the cache file as they come: never all in memory (cache.cached_rows)
        dev = next(adapted.parameters()).device
        with torch.inference_mode():
            for s in progress_bar(range(0, len(split), chunk), True, desc=f"body hidden states ({split.name})", leave=False):
                ids, attention, target = trimmed(split, list(range(s, min(s + chunk, len(split)))))
                out = adapted.hidden(ids.to(dev), attention.to(dev))
                yield out[(target != objectives.IGNORE).to(dev)].float().cpu()

    shape = (len(rows.target), adapted.model.config.hidden_size)
    rows.hidden = cached_rows({"content": h.hexdigest()}, Path(cache_dir) / "hidden", chunks, shape)
    return rows


def batch_inputs(adapted: Adapted, split: Split, rows: Rows, batch: list[int], cond_batch: list[int],
                 dev: torch.device, per_line: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The head's inputs for a batch: hidden states and targets of its scored rows (example-major), its
    conditioning vector (one per line when `per_line`: regimes.LEVELS) and each row's line; the experts are routed
    first."""
    adapted.route(split, batch)  # experts: the batch's expert (a no-op for the other regimes)
    idx = rows.index(batch)
    if rows.hidden is not None:
        hidden = rows.hidden[idx].to(dev)
    else:
        ids, attention, target = trimmed(split, batch)
        hidden = adapted.hidden(ids.to(dev), attention.to(dev))[(target != objectives.IGNORE).to(dev)]
    cond = None if not adapted.conditioned else split.cond_emb[batch].to(dev) if per_line else \
        split.cond_emb[cond_batch].mean(0).to(dev)
    lengths = rows.start[1:][batch] - rows.start[:-1][batch]
    owner = torch.repeat_interleave(torch.arange(len(batch)), lengths).to(dev)
    return hidden, rows.target[idx].to(dev), cond, owner


def batch_loss(adapted: Adapted, split: Split, rows: Rows, batch: list[int], cond_batch: list[int],
               dev: torch.device, per_line: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's scored positions, and how many there are."""
    hidden, target, cond, owner = batch_inputs(adapted, split, rows, batch, cond_batch, dev, per_line)
    return adapted.loss_sum(hidden, target, cond, owner), len(target)


@torch.no_grad()
def line_losses(adapted: Adapted, split: Split, rows: Rows, cfg: Config, dev: torch.device,
                batching: str) -> pd.DataFrame:
    """Every line's summed loss and scored tokens when the split arrives as a row of regimes.BATCHINGS says
    (clustering.incoming_batches): what intervals over lines, domains and batchings are computed from."""
    adapted.eval()
    loss = np.zeros(len(split))
    for batch, cond_batch in parallel.share(incoming_batches(split, cfg.batch_size, cfg.conditioning, batching)):
        with precision(cfg, dev):
            hidden, target, cond, owner = batch_inputs(adapted, split, rows, batch, cond_batch, dev,
                                                       LEVELS[cfg.cond_level].evaluates_per_line)
            per_row = adapted.row_losses(hidden, target, cond, owner).double().cpu()
        loss[batch] = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, owner.cpu(), per_row).numpy()
    return pd.DataFrame({"line": np.arange(len(split)), "tokens": (rows.start[1:] - rows.start[:-1]).numpy(),
                         "loss": parallel.all_sum(loss)})  # each line is in one process's batches


def pad_examples(split: Split, rows: Rows, protocol: str) -> torch.Tensor:
    """(N,) bool: examples whose scored target is the pad token. Only the authors' protocol scores a
    padded position (its one last position); under "causal" no target is padding."""
    if not PROTOCOLS[protocol].scores_padding or split.pad_id is None:
        return torch.zeros(len(split), dtype=torch.bool)
    first = rows.start[:-1].clamp(max=max(len(rows.target) - 1, 0))
    return (rows.start[1:] > rows.start[:-1]) & (rows.target[first] == split.pad_id)


@torch.no_grad()
def evaluate(adapted: Adapted, split: Split, rows: Rows, cfg: Config, dev: torch.device) -> dict:
    """Validation loss (token-weighted mean cross-entropy) and perplexity (exp of it), and the loss
    split by target kind: val_loss_pad on targets that are the pad token, val_loss_real on real
    tokens, pad_share the share of scored targets that are the pad token, so that
    val_loss = pad_share * val_loss_pad + (1 - pad_share) * val_loss_real (None for an empty kind)."""
    adapted.eval()
    pad = pad_examples(split, rows, cfg.protocol)
    sums = {True: [0.0, 0], False: [0.0, 0]}  # is-pad -> [summed loss, scored targets]
    for batch, cond in parallel.share(eval_batches(split.labels, cfg.batch_size, cfg.conditioning)):
        for kind in (True, False):  # the conditioning is the batch's, whichever part is scored
            part = [i for i in batch if bool(pad[i]) == kind]
            if part:
                with precision(cfg, dev):
                    loss, n = batch_loss(adapted, split, rows, part, cond, dev, LEVELS[cfg.cond_level].evaluates_per_line)
                sums[kind][0] += loss.item()
                sums[kind][1] += n
    sums = dict(zip((True, False), parallel.all_sum([sums[True], sums[False]]).tolist()))  # every process's batches
    total, count = sums[True][0] + sums[False][0], sums[True][1] + sums[False][1]
    loss = total / max(count, 1)
    per_kind = {k: sums[k][0] / sums[k][1] if sums[k][1] else None for k in (True, False)}
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_loss_pad": per_kind[True],
            "val_loss_real": per_kind[False], "pad_share": sums[True][1] / max(count, 1)}


@contextmanager
def precision(cfg: Config, dev: torch.device):
    """A batch's forward pass at cfg.precision: under "bf16", CUDA autocast to bfloat16 and TF32 for the
    matmuls left in float32 (the fused head loss); the weights and AdamW stay float32 either way."""
    if cfg.precision == "fp32":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def progress_bar(iterable, progress: bool, **kwargs) -> tqdm:
    """A tqdm bar, or none when `progress` is False or TQDM_DISABLE is set (non-empty, as tqdm reads it). Read here,
    at each call: tqdm's notebook bars ignore it, and a notebook executed by `make test` or `make notebooks-smoke`
    would draw a widget into its outputs for every run it trains."""
    return tqdm(iterable, disable=not progress or bool(os.environ.get("TQDM_DISABLE")), **kwargs)


def optimizer(cfg: Config, params: list[torch.Tensor]) -> torch.optim.AdamW | None:
    """AdamW over the trainable parameters (None when nothing trains), fused on CPU and CUDA: one vectorised pass
    a step instead of one per operation (the hypernetwork's 6.6 M parameters: about 4 ms a step instead of 14 ms
    on 2 CPU cores, hand-timed: BENCHMARKS.md "Training step")."""
    if not params:
        return None
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


@dataclass
class Session:
    """Everything one run's loop reads: what `setup` loaded and built, and where the run stands."""
    cfg: Config
    out: Path  # the run folder
    dev: torch.device
    adapted: Adapted
    tokenizer: object
    splits: dict[str, Split]  # "train", "validation"
    rows: dict[str, Rows]  # the same keys: their scored rows (cached hidden states for head-only regimes)
    params: list[torch.Tensor]  # the trainable parameters
    opt: torch.optim.AdamW | None
    shared: Config | None  # the run whose trained weights this one evaluates (runs.trained_by), if any
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training wall time so far

    def evaluate(self) -> dict:
        return evaluate(self.adapted, self.splits["validation"], self.rows["validation"], self.cfg, self.dev)


def train(cfg: Config, model=None, tokenizer=None, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg.regime under cfg.protocol; returns the run's metrics (also written to its folder).

    Args:
        cfg: the configuration; its seed reproduces the run.
        model, tokenizer: a backbone already loaded (it is modified: frozen, adapters added);
            None loads cfg.backbone.
        resume: continue an interrupted run from its last epoch checkpoint.
        progress: show tqdm progress bars.
    """
    if OBJECTIVES[cfg.objective].reward:
        raise ValueError(f"objective={cfg.objective!r} is trained by chameleon.reinforce.train (python -m chameleon reinforce)")
    done = finished(cfg)
    if done is not None:
        return done
    run = setup(cfg, model, tokenizer, resume)
    labels = run.splits["train"].labels.copy()
    labels[run.adapted.held_out()] = -1  # e.g. CEM's few shots: never trained on
    sampler = ClusterBatchSampler(labels, cfg.batch_size, seed=cfg.seed)
    for epoch in range(run.epoch, cfg.epochs if run.params else 0):
        train_epoch(run, sampler, epoch, progress)
    return finish(run)


def setup(cfg: Config, model=None, tokenizer=None, resume: bool = False) -> Session:
    """Load the data and the backbone, build the regime, write the run folder's config and centroids, and bring
    the run to where it stands: a resumed checkpoint, or the shared run's weights (runs.trained_by)."""
    out = run_dir(cfg)
    if out.exists() and not resume:
        warnings.warn(f"{out.name}: an unfinished run is there; starting it over (pass resume=True / --resume to continue it)")
    shared = trained_by(cfg)  # a step of the run plan: the run whose trained weights this one evaluates
    if shared is not None and finished(shared) is None:
        raise RunFailed(f"{out.name} evaluates the trained experts of {run_dir(shared)}, which is not finished: run "
                        f"the plan in order (runs.plan(cfg); `python -m chameleon train` and compare do)")
    # what can be wrong with the corpus or the device is found before the model loads
    dev = parallel.start(cfg.device)
    if cfg.precision == "bf16" and dev.type != "cuda":
        raise ValueError(f"precision='bf16' runs on CUDA only, and this run is on {dev.type}: bfloat16 autocast is slow "
                         f"on most CPUs and changes the numbers; use precision='fp32' (the default) here")
    with parallel.main_first():  # the main process fills the caches (embeddings, hidden states) the others read
        raw = {s: load_split_texts(cfg, s) for s in ("train", "validation")}
        if model is None:
            model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
        train_split, val_split, centroids = prepare(cfg, model, tokenizer, raw)
        adapted = build(cfg, model).to(dev)
        adapted.bind(train_split, val_split)  # the experts' groups and dispatch (a no-op for the other regimes)
        cache = cfg.cache_body and not adapted.blocks_adapted
        rows = {s.name: scored_rows(adapted, s, cache, cfg.cache_dir) for s in (train_split, val_split)}
    params = [p for p in adapted.parameters() if p.requires_grad]
    run = Session(cfg, out, dev, adapted, tokenizer, {"train": train_split, "validation": val_split}, rows, params,
                  optimizer(cfg, params), shared)

    def begin():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        save_centroids(out, centroids, adapted.bound())

    parallel.main_writes(begin)
    if resume and (out / CHECKPOINT).exists():
        run.history, run.epoch, run.step, run.seconds = load_checkpoint(out, adapted, run.opt)
    if not run.history:
        run.history.append({"epoch": 0, "step": 0, "train_loss": None, **run.evaluate()})
    if shared is not None and run.epoch < cfg.epochs:  # the other run's weights, evaluated here
        source = run_dir(shared)
        fix = f"delete {source} and train it again"
        tensors, meta = read_checkpoint(source, fix)
        load_weights(adapted, tensors, source, fix)
        run.epoch, run.step, run.seconds = cfg.epochs, meta["step"], meta["seconds"]
        run.history.append({"epoch": cfg.epochs, "step": run.step, "train_loss": meta["history"][-1]["train_loss"],
                            **run.evaluate()})
        parallel.main_writes(lambda: save_checkpoint(out, adapted, run.opt, run.history, cfg.epochs, run.step,
                                                     run.seconds))
    return run


def train_epoch(run: Session, sampler: ClusterBatchSampler, epoch: int, progress: bool) -> None:
    """One pass over the cluster batches: an AdamW step per processes x accumulate batches, an evaluation every
    cfg.eval_every steps and at the end, then the epoch's checkpoint."""
    cfg, adapted, opt = run.cfg, run.adapted, run.opt
    group = parallel.processes() * cfg.accumulate  # batches per optimizer step, over all processes
    mine = slice(parallel.rank() * cfg.accumulate, (parallel.rank() + 1) * cfg.accumulate)
    # dropout: an epoch replays identically after a resume, and each process draws its own masks
    torch.manual_seed((cfg.seed * 1000 + epoch) * parallel.processes() + parallel.rank())
    sampler.set_epoch(epoch)
    batches = list(sampler)  # the same order in every process
    pairs = list(zip(batches, condition_batches(batches, cfg.conditioning)))
    adapted.train()
    total, count, t0 = 0.0, 0, time.perf_counter()
    bar = progress_bar(range(0, len(pairs), group), progress and parallel.is_main(), total=-(-len(pairs) // group),
                       desc=f"{cfg.regime}/{cfg.protocol} epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for i in bar:
        step_pairs = pairs[i:i + group]  # the epoch's last step may have fewer batches: they are its count
        opt.zero_grad(set_to_none=True)
        local_sum, local_n = 0.0, 0
        for batch, cond in step_pairs[mine]:  # a process left without a batch adds zeros
            with precision(cfg, run.dev):
                loss_sum, n = batch_loss(adapted, run.splits["train"], run.rows["train"], batch, cond, run.dev,
                                         LEVELS[cfg.cond_level].trains_per_line)
            (loss_sum / max(n, 1) / len(step_pairs)).backward()
            local_sum, local_n = local_sum + loss_sum.item(), local_n + n
        step_sum, step_n = parallel.sum_step(run.params, local_sum, local_n)
        loss = torch.tensor(step_sum, dtype=torch.float32) / max(step_n, 1)  # as float32 as the batch's loss
        if not torch.isfinite(loss):  # every process sees the same sum, and stops
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {run.step + 1} (batches "
                                   f"{i}-{i + len(step_pairs) - 1} of the epoch, the first of examples "
                                   f"{step_pairs[0][0][:8]}...); " + _advice(cfg, run.out))
        opt.step()
        run.step += 1
        total, count = total + step_sum, count + step_n
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.eval_every and run.step % cfg.eval_every == 0:
            run.history.append({"epoch": epoch + i / len(batches), "step": run.step, "train_loss": loss.item(),
                                **run.evaluate()})
            _check_val_loss(run.history, cfg, run.out)
            adapted.train()
    run.seconds += time.perf_counter() - t0
    run.history.append({"epoch": epoch + 1, "step": run.step, "train_loss": total / max(count, 1), **run.evaluate()})
    _check_val_loss(run.history, cfg, run.out)
    run.epoch = epoch + 1
    parallel.main_writes(lambda: save_checkpoint(run.out, adapted, opt, run.history, epoch + 1, run.step, run.seconds))


def finish(run: Session) -> dict:
    """The run's result: its metrics, each validation line's loss under cfg.batchings (lines.csv), the generation
    metrics of an instruction run; written to metrics.json, which marks the run finished."""
    cfg, adapted, val = run.cfg, run.adapted, run.splits["validation"]
    result = {"config": cfg.to_dict(), "trainable_params": adapted.trainable(), "history": run.history,
              **{k: run.history[-1].get(k) for k in EVAL_METRICS},
              "seconds": round(run.seconds, 2), "finished": True, **adapted.report(),
              **({"experts_from": run_dir(run.shared).name} if run.shared is not None else {})}
    if cfg.batchings:
        lines = {b: line_losses(adapted, val, run.rows["validation"], cfg, run.dev, b) for b in cfg.batchings}
        result["batchings"] = {b: float(t.loss.sum() / t.tokens.sum()) for b, t in lines.items()}
        table = lines[cfg.batchings[0]][["line", "tokens"]].assign(
            domain=val.domains, **{f"loss_{b}": t.loss for b, t in lines.items()})
        parallel.main_writes(lambda: write_atomic(run.out / LINES, lambda tmp: table.to_csv(tmp, index=False)))
    if cfg.task == "instructions":  # BLEU / ROUGE-L / METEOR of greedy outputs on the first n_generate examples
        result.update(generation_metrics(adapted, val, cfg, run.tokenizer))  # in every process: few, greedy
    parallel.main_writes(lambda: write_metrics(run.out, result))
    return result


def _check_val_loss(history: list[dict], cfg: Config, out: Path) -> None:
    """Stop a run whose validation loss has blown up, so that it is never filed as a result.

    The rule: the last val loss is not finite, or exceeds max(2 * L0, L0 + 5 nats), L0 being
    the val loss before training (epoch 0); the 5 nats keep a small L0 (0.3 under the paper
    protocol on instructions) from tripping it. Every committed cpu run ends below L0, while a
    too-high lr (--lr 100 on smoke) lands thousands of nats above.
    """
    first, last = history[0]["val_loss"], history[-1]
    limit = max(2 * first, first + 5)
    if not (math.isfinite(last["val_loss"]) and last["val_loss"] <= limit):
        raise TrainingDiverged(f"val loss {last['val_loss']:.6g} at epoch {last['epoch']:.3g} (step {last['step']}) "
                               f"exceeds {limit:.4g}, the limit set by the val loss before training ({first:.4g}): "
                               f"the run diverged; " + _advice(cfg, out))


def _advice(cfg: Config, out: Path) -> str:
    where = (f"the last good checkpoint is in {out}" if (out / CHECKPOINT).exists()
             else "no checkpoint was written")
    return f"lower lr (now {cfg.lr}); {where}"
