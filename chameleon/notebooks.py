"""The runner behind `python -m chameleon notebooks`, and the notebooks' display helpers.

The method and its analysis live in their own modules (embeddings, clustering, objectives,
hypernetwork, runs, compare); here are only what runs the notebooks and what formats their
tables and texts. Everything a notebook computes is keyed by profile on disk (results/<profile>/,
figures/<profile>/, data/cache/), so a later notebook reads it back.

    run_notebooks("smoke", out_dir="runs/smoke")   # what `make reproduce PROFILE=smoke` does
"""
from __future__ import annotations

import json
import os
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from chameleon.config import ROOT, Config
from chameleon.regimes import conditioning_label

NOTEBOOKS = ROOT / "notebooks"


def quiet() -> None:
    """No library warnings or Hugging Face download bars in notebook outputs, and tables wide enough
    for example texts. The kit's own tqdm bars stay on in JupyterLab (long cells show progress); the
    runner (`run_notebooks`) and `make test` set TQDM_DISABLE=1, so committed outputs hold none."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")  # tqdm.auto's "IProgress not found" among them
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
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
    # TQDM_DISABLE: no progress bars in the executed copies (tqdm reads it when first imported)
    with _env(CHAMELEON_PROFILE=profile, PYTHONHASHSEED="0", TQDM_DISABLE="1"):
        for nb in notebooks or notebook_paths():
            log(f"running {nb.name} ({profile})")
            target = out / nb.name
            papermill.execute_notebook(str(nb), str(target), parameters={"profile": profile} if inject else None,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
            if out.resolve() == NOTEBOOKS.resolve():
                strip_run_metadata(target)
            done.append(target)
    return done


def strip_run_metadata(path: Path) -> None:
    """Drop what papermill and Jupyter record of one execution (timings, this machine's paths) from
    a committed notebook: it would change at every run and on every machine."""
    nb = json.loads(path.read_text())
    nb["metadata"].pop("papermill", None)
    for cell in nb["cells"]:
        for key in ("execution", "papermill"):
            cell["metadata"].pop(key, None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


# --- display helpers ---------------------------------------------------------------------

def cluster_examples(texts: list[str], labels, per_cluster: int = 2, width: int = 90) -> pd.DataFrame:
    """The first `per_cluster` texts of each cluster, cut to `width` characters."""
    rows = [{"cluster": int(c), "text": texts[i][:width]}
            for c in np.unique(labels) for i in np.flatnonzero(np.asarray(labels) == c)[:per_cluster]]
    return pd.DataFrame(rows)


def beside_paper(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The paper's table beside this kit's rows of one protocol (a compare() table; batch_mean
    conditioning for the hypernetwork: the rows whose conditioning plots.UNNAMED_CONDITIONINGS leaves unnamed)."""
    from chameleon.compare import PAPER_TABLE
    from chameleon.plots import UNNAMED_CONDITIONINGS

    ours = table[(table["protocol"] == protocol) & table["conditioning"].isin(UNNAMED_CONDITIONINGS)]
    ours = ours[["regime", "trainable_params", "val_loss", "val_ppl"]]
    return PAPER_TABLE.merge(ours, on="regime", how="outer", suffixes=(f" {PUBLISHED}", " (kit)"))


PUBLISHED = "published (GPT-2, WikiText-2)"  # the publication's numbers, named apart from the `authors` protocol


def tidy(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A table for reading: parameter and seed counts as integers with thousands separators, other
    numbers rounded to `digits` decimals, and a dash where a value is missing (never NaN). A column
    with a `<col>_std` partner (a compare() table over several seeds) reads "mean ± std"."""
    out = table.copy().astype(object)
    for col in table.columns:
        if str(col).endswith("_std") and str(col)[:-4] in table:
            continue
        values = table[col]
        if not pd.api.types.is_numeric_dtype(values):
            out[col] = values.where(values.notna(), "–")
        elif "params" in str(col) or str(col) in ("seeds", "seed"):
            out[col] = [f"{int(v):,}" if pd.notna(v) else "–" for v in values]
        else:
            out[col] = [f"{v:.{digits}f}" if pd.notna(v) else "–" for v in values]
            std = table.get(f"{col}_std")
            if std is not None and (table.get("seeds", pd.Series([2])) > 1).all():
                out[col] = [f"{m} ± {v:.{digits}f}" if pd.notna(v) else m for m, v in zip(out[col], std)]
    return out.drop(columns=[c for c in table.columns if str(c).endswith("_std") and str(c)[:-4] in table])


def generations(runs: list[dict], n: int = 3) -> pd.DataFrame:
    """The first n greedy generations stored in each finished run's metrics.json, long format:
    example, instruction, input, reference, regime, protocol, conditioning, output. Every run of a
    profile generates for the same validation examples, so rows with one `example` line up."""
    rows = []
    for r in runs:
        cond = conditioning_label(r["config"]["regime"], r["config"]["conditioning"], r["config"].get("dispatch"))
        for i, g in enumerate(r.get("generations", [])[:n]):
            rows.append({"example": i, **{k: g[k] for k in ("instruction", "input", "reference")},
                         "regime": r["config"]["regime"], "protocol": r["config"]["protocol"],
                         "conditioning": cond, "output": g["output"]})
    return pd.DataFrame(rows)


def side_by_side(gens: pd.DataFrame, width: int = 100) -> str:
    """A plain-text block per example: its instruction, input and reference, then the output of
    every run (regime (conditioning) / protocol, the conditioning named as in the figures:
    plots.run_name), wrapped to `width` characters."""
    def wrap(label: str, text: str, indent: int) -> str:
        return textwrap.fill(text or "(empty)", width, initial_indent=f"{label:<{indent}}",
                             subsequent_indent=" " * indent, replace_whitespace=True)

    from chameleon.plots import run_name

    blocks = []
    for example, part in gens.groupby("example", sort=True):
        first = part.iloc[0]
        lines = [f"=== example {example}", wrap("instruction:", first["instruction"], 13)]
        if first["input"]:
            lines.append(wrap("input:", first["input"], 13))
        lines.append(wrap("reference:", first["reference"], 13))
        tags = [f"{run_name(r.regime, r.conditioning)} / {r.protocol}" for r in part.itertuples()]
        pad = max(len(t) for t in tags) + 4  # "  " + tag + ":" + " "
        lines += [wrap(f"  {t}:", out, pad) for t, out in zip(tags, part["output"])]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
