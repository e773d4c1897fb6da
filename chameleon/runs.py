"""A run's life on disk: its name and folder, its checkpoint, and its row in a results table.

    results/<profile>/<task>/runs/<regime>-<protocol>-<conditioning>-seed<S>-<hash>/
        config.json                the Config of the run
        metrics.json, metrics.csv  train / validation loss and perplexity per epoch; "finished" once done
                                   (a REINFORCE run: metrics.json with the reward per step, and report.md)
        checkpoint.safetensors     trainable weights, AdamW state and history after the last epoch
        centroids.safetensors      the train split's k-means centroids (serving routes prompts to them)
        lines.csv                  with cfg.batchings: each validation line's domain, scored tokens and summed loss

The hash covers everything that changes the result (the whole Config and a fingerprint of the
data source), so a finished run is read back instead of retrained, and a changed setting never
reads a stale one.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chameleon.cache import write_atomic
from chameleon.config import ADDED_FIELDS, EXPERT_FIELDS, REINFORCE_FIELDS, Config
from chameleon.data import fingerprint
from chameleon.adapters.model import build
from chameleon.parallel import processes
from chameleon.regimes import (CONDITIONINGS, DISPATCHES, LEVELS, OBJECTIVES, PROTOCOLS, REGIMES, TRAINING_DISPATCH,
                               conditioning_label)

RUN_KEYS = ("regime", "protocol", "conditioning", "dispatch", "score_from", "seed")  # what varies between the runs of one profile
CHECKPOINT = "checkpoint.safetensors"  # weights, optimizer state and run metadata in one file
CENTROIDS = "centroids.safetensors"  # the train split's k-means centroids
LINES = "lines.csv"  # every validation line's loss under each of cfg.batchings (training.line_losses)
EVAL_METRICS = ("val_loss", "val_ppl", "val_loss_pad", "val_loss_real", "pad_share")  # of every evaluation (training.evaluate)
METRICS = (*EVAL_METRICS, "bleu", "rouge_l", "meteor", "seconds",  # those a run may report
           "passes", "dispatch_accuracy")  # SVF: forward passes per request; classifier == oracle share of batches


def run_name(cfg: Config) -> str:
    """regime-protocol-conditioning-seed (dispatch for experts, "reinforce" for a REINFORCE run), and a hash of
    everything that changes the result, the number of processes of a data-parallel run included."""
    source = fingerprint(cfg.corpus if cfg.task == "lm" else cfg.instructions)
    key = {**cfg.to_dict(), "data": source, "results_dir": None, "data_dir": None, "device": None}  # where things go never changes them
    if not REGIMES[cfg.regime].experts:  # settings it never reads: every older run keeps its name
        key = {k: v for k, v in key.items() if k not in EXPERT_FIELDS}
    defaults = Config()
    for name in ADDED_FIELDS:  # added later: runs made before them keep their names
        if name in key and getattr(cfg, name) == getattr(defaults, name):
            del key[name]
    if processes() > 1:  # a step then sums processes x accumulate batches: another run than one process's
        key["processes"] = processes()
    objective = OBJECTIVES[cfg.objective]
    if not objective.reward:  # added with REINFORCE, which alone reads them: next-token runs keep their names
        key = {k: v for k, v in key.items() if k not in REINFORCE_FIELDS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    # the slot of the hypernetwork's conditioning, which an SVF run has none of, says how it was trained
    condition = cfg.objective if objective.reward else cfg.dispatch if REGIMES[cfg.regime].experts \
        else cfg.conditioning
    return f"{cfg.regime}-{cfg.protocol}-{condition}-seed{cfg.seed}-{digest}"


def trained_by(cfg: Config) -> Config | None:
    """The run whose trained weights cfg's run evaluates, or None when it trains its own. Experts are
    trained under the training dispatch (regimes.Dispatch.trains: each batch to its true group's expert)
    whatever cfg.dispatch says, so a run under another dispatch evaluates that run's experts: as in
    Transformer², experts are trained once and the dispatch is a choice made at inference. Likewise a
    conditioning applied at inference alone (Conditioning.trained_as) evaluates the run of the one it names."""
    if REGIMES[cfg.regime].experts and not DISPATCHES[cfg.dispatch].trains:
        return cfg.replace(dispatch=TRAINING_DISPATCH)
    if REGIMES[cfg.regime].conditioned and (source := CONDITIONINGS[cfg.conditioning].trained_as):
        return cfg.replace(conditioning=source)
    level = LEVELS[cfg.cond_level]
    if REGIMES[cfg.regime].conditioned and level.evaluates_per_line and not level.trains_per_line:
        return cfg.replace(cond_level=next(n for n, lv in LEVELS.items() if not lv.evaluates_per_line))
    return None


def plan(cfg: Config) -> list[Config]:
    """The runs that cfg's run needs, in the order to run them, cfg's own last."""
    source = trained_by(cfg)
    return ([] if source is None else plan(source)) + [cfg]


def results_folder(cfg: Config) -> Path:
    """results/<profile>/<task>/: the tables of cfg's profile and task, and their runs/."""
    return Path(cfg.results_dir) / cfg.profile / cfg.task


def run_dir(cfg: Config) -> Path:
    return results_folder(cfg) / "runs" / run_name(cfg)


def lock_path(cfg: Config) -> Path:
    """The lock a worker holds while it trains cfg's run (chameleon.experiments.locks), beside its folder."""
    return run_dir(cfg).parent / f"{run_name(cfg)}.lock"


def finished(cfg: Config) -> dict | None:
    """The metrics of cfg's finished run, or None."""
    return read_finished(run_dir(cfg))


def read_finished(run: Path) -> dict | None:
    """The metrics.json of a finished run folder, or None."""
    path = Path(run) / "metrics.json"
    if path.exists():
        result = json.loads(path.read_text())
        if result.get("finished"):
            return result
    return None


def read_config(run: Path) -> Config:
    """A run folder's Config, from its config.json (paths and tuples restored; unknown keys ignored)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run} holds no config.json: not a run folder written by `python -m chameleon train`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run folder is damaged, train the run again") from None
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in raw.items() if k in fields}
    for k in ("data_dir", "results_dir"):
        if k in values:
            values[k] = Path(values[k])
    for k in ("hyper_hidden", "batchings"):
        if k in values:
            values[k] = tuple(values[k])
    try:
        return Config(**values).validated()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} does not describe a valid configuration ({err})") from None


def save_centroids(out: Path, centroids: np.ndarray, bound: dict[str, torch.Tensor] | None = None) -> None:
    """The train split's k-means centroids, which serving routes new prompts to, and what the adapter
    components computed from the data (`Adapted.bound`: the experts' prompt centroids)."""
    tensors = {"centroids": torch.from_numpy(centroids).contiguous(), **(bound or {})}
    write_atomic(out / CENTROIDS, lambda tmp: save_file(tensors, tmp))


def read_centroids(run: Path) -> dict[str, torch.Tensor]:
    """What `save_centroids` stored in a run folder; {} for runs of older versions of the kit."""
    path = Path(run) / CENTROIDS
    return load_file(path) if path.is_file() else {}


def write_metrics(out: Path, result: dict) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train_loss", *EVAL_METRICS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["history"])
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))


def save_checkpoint(out: Path, adapted, opt, history, epoch: int, step: int, seconds: float) -> None:
    """Trainable weights and AdamW state as safetensors, the rest as JSON in the same file's
    metadata (no pickle): one file replaced atomically, so a kill can never pair the weights
    of one epoch with the history of another."""
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in adapted.named_parameters() if p.requires_grad}
    state = opt.state_dict()
    for i, s in state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().cpu().reshape(v.shape).contiguous() for k, v in s.items()})
    meta = {"epoch": epoch, "step": step, "seconds": seconds, "history": history, "param_groups": state["param_groups"]}
    write_atomic(out / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata={"checkpoint": json.dumps(meta)}))


def read_checkpoint(out: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of out/checkpoint.safetensors and its run metadata (None in files of older
    versions of the kit); an unreadable file is a ValueError that ends with `fix`."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{out} has no {CHECKPOINT}: the run never finished an epoch; {fix}")
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("checkpoint")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return tensors, None if meta is None else json.loads(meta)
    except (SafetensorError, OSError, ValueError) as err:  # ValueError: also bad JSON
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); {fix}") from None


def load_weights(adapted, tensors: dict[str, torch.Tensor], where: Path, fix: str) -> None:
    """Copy a checkpoint's trainable weights into `adapted`, after checking that every name and
    shape fits (the one loader, for resume and for using a trained run)."""
    params = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    want = {n: tuple(p.shape) for n, p in params.items()}
    got = {n[len("param."):]: tuple(v.shape) for n, v in tensors.items() if n.startswith("param.")}
    if got != want:
        bad = [f"{n}: {got.get(n, 'absent')} in the file, {want.get(n, 'absent')} in the model"
               for n in sorted(want.keys() | got.keys()) if got.get(n) != want.get(n)]
        raise ValueError(f"checkpoint {where / CHECKPOINT} does not fit this model ({len(bad)} tensors differ, "
                         f"e.g. {bad[0]}); {fix}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])


def load_checkpoint(out: Path, adapted, opt):
    """Restore what save_checkpoint wrote into `adapted` and `opt`; returns (history, epoch, step, seconds)."""
    fix = f"delete {out} to start over, or run without --resume (resume=False)"
    tensors, meta = read_checkpoint(out, fix)
    if meta is None:
        raise ValueError(f"checkpoint {out / CHECKPOINT} is unreadable (it holds no run metadata: an older version "
                         f"of the kit wrote it); {fix}")
    load_weights(adapted, tensors, out, fix)
    state = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["history"], meta["epoch"], meta["step"], meta["seconds"]


def load_trained(cfg: Config, model, run: Path | None = None):
    """Build cfg's regime around `model` and load the trained weights of its finished run (eval mode).

    Args:
        cfg: the run's configuration (`read_config(run)` for a folder).
        model: the backbone, loaded; it is modified (frozen, adapters attached).
        run: the run folder; None: `run_dir(cfg)`.
    """
    run = Path(run) if run is not None else run_dir(cfg)
    if read_finished(run) is None:
        raise ValueError(f"{run} holds no finished run; train it first (python -m chameleon train --profile "
                         f"{cfg.profile} --regime {cfg.regime} ...), or finish it with --resume")
    adapted, fix = build(cfg, model), f"delete {run} and train the run again"
    if any(p.requires_grad for p in adapted.parameters()):  # `unadapted` trains nothing, writes no checkpoint
        load_weights(adapted, read_checkpoint(run, fix)[0], run, fix)
    adapted.restore(read_centroids(run))  # what the components learnt from the data (experts: prompt centroids)
    return adapted.eval()


def finished_runs(cfg: Config) -> list[dict]:
    """Every finished run under cfg's results folder that cfg's settings would produce with only
    regime, protocol, conditioning and seed changed; runs of older settings are skipped."""
    runs = []
    for path in sorted((results_folder(cfg) / "runs").glob("*/metrics.json")):
        result = json.loads(path.read_text())
        keys = {k: result["config"][k] for k in RUN_KEYS if k in result["config"]}
        if result.get("finished") and run_dir(cfg.replace(**keys)) == path.parent:
            runs.append(result)
    return runs


def result_row(result: dict) -> dict:
    """One run as a row of a results table: regime, protocol, conditioning ("-" where the regime
    has no hypernetwork), seed, trainable_params and every metric the run reports."""
    c = result["config"]
    return {"regime": c["regime"], "protocol": c["protocol"], "conditioning": conditioning_label(c["regime"], c["conditioning"], c.get("dispatch")),
            "scored": scored_label(c), "seed": c["seed"], "trainable_params": result["trainable_params"],
            **{k: result[k] for k in METRICS if result.get(k) is not None}}


def scored_label(c: dict) -> str:
    """Which positions a run scores, as tables show it: "last" (the authors' protocol's one position),
    "all", or "from P" (score_from, or a `prefix` run's first P tokens left out)."""
    protocol = PROTOCOLS[c["protocol"]]
    if protocol.scores_padding:
        return protocol.scores
    start = max(c.get("score_from", 0), c["prefix_tokens"] if CONDITIONINGS[c["conditioning"]].prefix else 0)
    return f"from {start}" if start else protocol.scores


def histories(runs: list[dict]) -> pd.DataFrame:
    """Per-epoch history of each run, long format: regime, protocol, conditioning, scored, seed, epoch, ..."""
    return pd.DataFrame([{**{k: v for k, v in result_row(r).items() if k in RUN_KEYS + ("scored",)}, **h}
                         for r in runs for h in r["history"]])
