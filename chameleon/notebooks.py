"""Helpers the notebooks call, and the runner behind `python -m chameleon notebooks`.

The notebooks stay short: each cell calls one function from here, from chameleon.plots
or from the method modules. Everything a notebook computes is keyed by profile on disk
(results/<profile>/, figures/<profile>/, data/cache/), so a later notebook reads it back.

    run_notebooks("smoke", out_dir="runs/smoke")   # what `make reproduce PROFILE=smoke` does
"""
from __future__ import annotations

import json
import os
import warnings

# Notebook outputs hold no stderr noise: tqdm.auto warns in a kernel without ipywidgets as soon as
# any library imports it, and tqdm reads TQDM_DISABLE when it is imported.
warnings.filterwarnings("ignore", message="IProgress not found")
os.environ.setdefault("TQDM_DISABLE", "1")
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from chameleon.config import ROOT, Config
from chameleon.data import tokenize
from chameleon.embeddings import embedding_mask, mean_embeddings

NOTEBOOKS = ROOT / "notebooks"
RUN_KEYS = ("regime", "protocol", "conditioning", "seed")  # what varies between the runs of one profile


def quiet() -> None:
    """No progress bars or library warnings in notebook outputs (they go to stderr, which nbval
    compares), and tables wide enough for example texts."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pd.set_option("display.max_colwidth", 90)


# --- running the notebooks ---------------------------------------------------------------

def notebook_paths() -> list[Path]:
    """notebooks/[0-9]*.ipynb in order."""
    return sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run_notebooks(profile: str, out_dir: Path | str | None = None, inject: bool = True,
                  notebooks: list[Path] | None = None, log=print) -> list[Path]:
    """Execute the notebooks in order with papermill on `profile`; returns the executed copies.

    Args:
        profile: sets $CHAMELEON_PROFILE for the kernel and, if `inject`, the `profile` parameter.
        out_dir: where the executed copies go (default runs/<profile>/); the notebooks folder
            itself to refresh the committed outputs in place.
        inject: pass `-p profile P` (papermill adds an `injected-parameters` cell). The committed
            copies are made with inject=False: the parameters cell reads $CHAMELEON_PROFILE.
        notebooks: a subset (default: all of notebook_paths()).
    """
    import papermill

    Config.from_profile(profile)  # unknown profile: ValueError before any kernel starts
    out = Path(out_dir) if out_dir is not None else ROOT / "runs" / profile
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with _env(CHAMELEON_PROFILE=profile, PYTHONHASHSEED="0", TQDM_DISABLE="1"):
        for nb in notebooks or notebook_paths():
            log(f"running {nb.name} ({profile})")
            target = out / nb.name
            papermill.execute_notebook(str(nb), str(target), parameters={"profile": profile} if inject else None,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
            done.append(target)
    return done


# --- 01: embeddings and padding ----------------------------------------------------------

def padding_effect(model, tokenizer, texts: list[str], max_length: int) -> pd.DataFrame:
    """Cosine similarity between the paper-protocol (padding counted) and causal-protocol
    (real tokens only) mean embedding of each text."""
    enc = tokenize(texts, tokenizer, max_length)
    emb = {p: mean_embeddings(model, enc["input_ids"], embedding_mask(enc["attention_mask"], p))
           for p in ("paper", "causal")}
    real = enc["attention_mask"].sum(1)
    return pd.DataFrame({"text": [t[:50] for t in texts], "real_tokens": real.tolist(),
                         "padding_tokens": (max_length - real).tolist(),
                         "cosine": (emb["paper"] * emb["causal"]).sum(1).numpy().round(3)})


def pair_similarity(model, tokenizer, a: str, b: str, max_length: int) -> dict[str, float]:
    """Cosine similarity of the mean embeddings of texts a and b under each protocol."""
    enc = tokenize([a, b], tokenizer, max_length)
    out = {}
    for protocol in ("paper", "causal"):
        e = mean_embeddings(model, enc["input_ids"], embedding_mask(enc["attention_mask"], protocol))
        out[protocol] = round(float(e[0] @ e[1]), 3)
    return out


# --- 02: clusters ------------------------------------------------------------------------

def cluster_examples(texts: list[str], labels, per_cluster: int = 2, width: int = 90) -> pd.DataFrame:
    """The first `per_cluster` texts of each cluster, cut to `width` characters."""
    rows = [{"cluster": int(c), "text": texts[i][:width]}
            for c in np.unique(labels) for i in np.flatnonzero(np.asarray(labels) == c)[:per_cluster]]
    return pd.DataFrame(rows)


# --- 03: the unadapted baseline ----------------------------------------------------------

@torch.no_grad()
def paper_last_position(model, tokenizer, split) -> pd.DataFrame:
    """Per validation example under the paper protocol: the token at the last position (the
    target), whether it is the pad token, the model's loss on it and its top prediction."""
    hidden = model.base_model(input_ids=split.input_ids, attention_mask=split.attention).last_hidden_state[:, -1]
    logits = model.get_output_embeddings()(hidden)
    target = split.input_ids[:, -1]
    return pd.DataFrame({"target": tokenizer.convert_ids_to_tokens(target.tolist()),
                         "target_is_pad": (target == tokenizer.pad_token_id).tolist(),
                         "loss": F.cross_entropy(logits, target, reduction="none").double().numpy(),
                         "predicted": tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())})


# --- training runs and results -----------------------------------------------------------

def finished_runs(profile: str, task: str = "lm") -> list[dict]:
    """Every finished run of `profile` on disk that the profile's current settings would produce
    (only regime, protocol, conditioning and seed vary); stale runs of older settings are skipped."""
    from chameleon.training import run_dir

    runs = []
    for path in sorted((ROOT / "results" / profile / task / "runs").glob("*/metrics.json")):
        result = json.loads(path.read_text())
        keys = {k: result["config"][k] for k in RUN_KEYS}
        if result.get("finished") and run_dir(Config.from_profile(profile, task=task, **keys)) == path.parent:
            runs.append(result)
    return runs


def histories(runs: list[dict]) -> pd.DataFrame:
    """Per-epoch history of each run, long format: regime, protocol, conditioning, seed, epoch, ..."""
    return pd.DataFrame([{**{k: r["config"][k] for k in RUN_KEYS}, **h} for r in runs for h in r["history"]])


def summary(runs: list[dict]) -> pd.DataFrame:
    """compare.summarise of finished runs: mean (and std) per regime x protocol x conditioning."""
    from chameleon.compare import summarise

    per_run = pd.DataFrame([{**{k: r["config"][k] for k in RUN_KEYS}, "trainable_params": r["trainable_params"],
                             **{k: r[k] for k in ("val_loss", "val_ppl", "seconds")}} for r in runs])
    if per_run.empty:
        return per_run
    per_run.loc[~per_run["regime"].str.startswith("chameleon"), "conditioning"] = "-"
    return summarise(per_run)


def beside_paper(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The paper's table beside this kit's rows of one protocol (a compare() table; batch_mean
    conditioning for the hypernetwork)."""
    from chameleon.compare import PAPER_TABLE

    ours = table[(table["protocol"] == protocol) & table["conditioning"].isin(["-", "batch_mean"])]
    ours = ours[["regime", "trainable_params", "val_loss", "val_ppl"]]
    return PAPER_TABLE.merge(ours, on="regime", how="outer", suffixes=(" (paper)", " (kit)"))


# --- 05: what the hypernetwork generates -------------------------------------------------

def load_trained(cfg: Config, model):
    """Build cfg's regime around `model` and load the trainable weights of its finished run."""
    from safetensors.torch import load_file

    from chameleon.regimes import build
    from chameleon.training import run_dir

    adapted = build(cfg, model)
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for name, value in load_file(run_dir(cfg) / "checkpoint.safetensors").items():
            if name.startswith("param."):
                params[name[len("param."):]].copy_(value)
    return adapted.eval()


@torch.no_grad()
def adapter_stats(head, cond_emb: torch.Tensor, labels) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per cluster: the norms of the A, B and update scaling * B @ A that `head` generates from the
    cluster's mean embedding; and the cosine similarity of the updates of every pair of clusters.
    Uses <B_i A_i, B_j A_j> = trace((B_i^T B_j)(A_j A_i^T)), so no d_out x d_in matrix is formed."""
    head.eval()
    clusters = np.unique(labels)
    cond = torch.stack([cond_emb[torch.as_tensor(np.asarray(labels) == c)].mean(0) for c in clusters])
    A, B = head.generate_adapter(cond)  # (k, r, d_in), (k, d_out, r)
    A, B = A.double(), B.double()
    gram = head.scaling ** 2 * (torch.einsum("iar,jas->irjs", B, B) * torch.einsum("ird,jsd->irjs", A, A)).sum((1, 3))
    norm = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norm[:, None] * norm[None, :]).clamp(min=1e-30)
    norms = pd.DataFrame({"cluster": clusters, "norm_A": A.flatten(1).norm(dim=1).float().numpy(),
                          "norm_B": B.flatten(1).norm(dim=1).float().numpy(), "norm_update": norm.float().numpy()})
    return norms, pd.DataFrame(cos.float().numpy(), index=clusters, columns=clusters)


# --- 07: instruction tuning --------------------------------------------------------------

def scored_tokens(prompt: str, response: str, tokenizer, max_length: int) -> pd.DataFrame:
    """Which positions of one instruction example each protocol scores, and against which token.

    The example is encoded as training encodes it (prompt + response + EOS, right-padded to
    max_length, loss from the first response token on). One row per position that either
    protocol scores: its token, and the target of the hidden state there ("" if not scored).
    """
    from chameleon import objectives
    from chameleon.instructions import response_start

    enc = tokenize([prompt + response + tokenizer.eos_token], tokenizer, max_length)
    start = response_start([prompt], tokenizer)
    show = lambda ids: [repr(tokenizer.decode([i])) for i in ids]  # noqa: E731
    tokens = show(enc["input_ids"][0].tolist())
    cols = {}
    for protocol in ("causal", "paper"):
        t = objectives.targets(enc["input_ids"], enc["attention_mask"], protocol, start)[0]
        cols[protocol] = ["" if v == objectives.IGNORE else s for v, s in zip(t.tolist(), show(t.clamp(min=0).tolist()))]
    rows = [{"position": i, "token": tokens[i], "causal target": cols["causal"][i], "paper target": cols["paper"][i]}
            for i in range(len(tokens)) if cols["causal"][i] or cols["paper"][i]]
    return pd.DataFrame(rows)


def run_scores(runs: list[dict]) -> pd.DataFrame:
    """One row per finished instruction run: validation loss and perplexity, and BLEU, ROUGE-L and
    METEOR of its greedy generations (as train() stored them; conditioning "-" outside chameleon)."""
    rows = [{**{k: r["config"][k] for k in ("regime", "protocol", "conditioning", "seed")},
             "trainable_params": r["trainable_params"],
             **{k: r.get(k) for k in ("val_loss", "val_ppl", "bleu", "rouge_l", "meteor")}} for r in runs]
    df = pd.DataFrame(rows)
    if not df.empty:
        df.loc[~df["regime"].str.startswith("chameleon"), "conditioning"] = "-"
    return df


def generations(runs: list[dict], n: int = 3) -> pd.DataFrame:
    """The first n greedy generations stored in each finished run's metrics.json, long format:
    example, instruction, input, reference, regime, protocol, conditioning, output. Every run of a
    profile generates for the same validation examples, so rows with one `example` line up."""
    rows = []
    for r in runs:
        cond = r["config"]["conditioning"] if r["config"]["regime"].startswith("chameleon") else "-"
        for i, g in enumerate(r.get("generations", [])[:n]):
            rows.append({"example": i, **{k: g[k] for k in ("instruction", "input", "reference")},
                         "regime": r["config"]["regime"], "protocol": r["config"]["protocol"],
                         "conditioning": cond, "output": g["output"]})
    return pd.DataFrame(rows)


def side_by_side(gens: pd.DataFrame, width: int = 100) -> str:
    """A plain-text block per example: its instruction, input and reference, then the output of
    every run (regime / conditioning / protocol), wrapped to `width` characters."""
    import textwrap

    def wrap(label: str, text: str, indent: int) -> str:
        return textwrap.fill(text or "(empty)", width, initial_indent=f"{label:<{indent}}",
                             subsequent_indent=" " * indent, replace_whitespace=True)

    blocks = []
    for example, part in gens.groupby("example", sort=True):
        first = part.iloc[0]
        lines = [f"=== example {example}", wrap("instruction:", first["instruction"], 13)]
        if first["input"]:
            lines.append(wrap("input:", first["input"], 13))
        lines.append(wrap("reference:", first["reference"], 13))
        tags = [f"{r.regime}{'' if r.conditioning == '-' else f' ({r.conditioning})'} / {r.protocol}"
                for r in part.itertuples()]
        pad = max(len(t) for t in tags) + 4  # "  " + tag + ":" + " "
        lines += [wrap(f"  {t}:", out, pad) for t, out in zip(tags, part["output"])]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
