"""The runner behind `python -m chameleon notebooks`, and the notebooks' set-up (`quiet`).

The method lives in its own modules (embeddings, clustering, objectives, hypernetwork, runs,
compare); what only the notebooks compute and show is in chameleon.experiments.analysis; here is only what
runs the notebooks. Everything a notebook computes is keyed by profile on disk (results/<profile>/,
figures/<profile>/, data/cache/), so a later notebook reads it back.

    run_notebooks("smoke", out_dir="runs/smoke")   # what `make reproduce PROFILE=smoke` does
"""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from chameleon.config import ROOT, Config

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
            start = time.perf_counter()
            # progress_bar: papermill's count of executed cells, the progress of a long notebook. The kernel logs
            # at ERROR only: its warning about local TCP without encryption would repeat for every notebook.
            papermill.execute_notebook(str(nb), str(target), parameters={"profile": profile} if inject else None,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=True,
                                       extra_arguments=["--log-level=ERROR"])
            log(f"{nb.name}: {time.perf_counter() - start:.0f} s")  # the timings of docs/workshop.md
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
