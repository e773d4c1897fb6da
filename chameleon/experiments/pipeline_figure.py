"""The method on one page: ChamaleonLLM's pipeline and the two protocols, drawn with boxes and arrows.

Notebook 01 opens with it. It draws no measured number, so it is the same on every profile:

    fig = draw()        # a matplotlib Figure
    save(fig, path())   # figures/pipeline.png, stamped with code_hash() (tests/test_pipeline_figure.py)
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from chameleon.config import ROOT
from chameleon.regimes import REGIMES

GREY, LORA, CHAMELEON = "#eeeeee", REGIMES["lora"].colour, REGIMES["chameleon"].colour
W, H = 0.165, 0.15  # a box's width and height, in axes units (the axes run 0-1 both ways)


def box(ax, x: float, y: float, text: str, colour: str = GREY, width: float = W, height: float = H) -> None:
    """A rounded box centred at (x, y) with its text."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.008",
                                facecolor=colour, edgecolor="#333333", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=10.5, wrap=True)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
    """An arrow from start to end, its label beside its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.4, color="#333333"))
    if label:
        ax.text((start[0] + end[0]) / 2 + 0.012, (start[1] + end[1]) / 2, label, fontsize=11, ha="left",
                va="center", style="italic")


def draw() -> plt.Figure:
    """The pipeline: top row, the batch-aware part (what ChamaleonLLM adds); middle row, the language model
    with ordinary LoRA; bottom row, the two ways the kit scores it."""
    fig, ax = plt.subplots(figsize=(15, 8.2))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.axis("off")

    # 1. what ChamaleonLLM adds: embed, cluster, batch, generate the adapter
    top = 0.80
    xs = [0.09, 0.29, 0.49, 0.69, 0.89]
    texts = ["text lines\n(training set, or a\nbatch of requests)",
             "mean token embedding\nrows of the input table,\naveraged, norm 1\n(no forward pass)",
             "k-means\nk = N // batch size\n(at inference: nearest\ncentroid, or k-means\nof the requests)",
             "one-cluster batches\nevery batch holds\nsimilar lines",
             "hypernetwork (MLP)\nbatch's mean embedding\n-> A (r x d), B (V x r)"]
    for x, text in zip(xs, texts):
        box(ax, x, top, text, CHAMELEON if "hypernetwork" in text else GREY)
    for a, b in zip(xs, xs[1:]):
        arrow(ax, (a + W / 2 + 0.01, top), (b - W / 2 - 0.01, top))
    ax.text(0.01, 0.97, "What ChamaleonLLM adds: one adapter written per batch", fontsize=13, weight="bold")

    # 2. the language model: frozen blocks, then the LM head with a low-rank update
    mid = 0.47
    box(ax, 0.09, mid, "token ids\nof the batch")
    box(ax, 0.34, mid, "frozen transformer\nblocks\n(+ ordinary LoRA in\nthe blocks: lora_full)", width=0.2)
    box(ax, 0.59, mid, "hidden state h\n(last layer)")
    box(ax, 0.87, mid, "LM head\nW h + s · B (A h)\n-> logits over the\nvocabulary", CHAMELEON, width=0.2)
    arrow(ax, (0.09 + W / 2 + 0.01, mid), (0.24 - 0.01, mid))
    arrow(ax, (0.44 + 0.01, mid), (0.59 - W / 2 - 0.01, mid))
    arrow(ax, (0.59 + W / 2 + 0.01, mid), (0.77 - 0.01, mid))
    arrow(ax, (0.89, top - H / 2 - 0.01), (0.89, mid + H / 2 + 0.01), "A, B")
    ax.text(0.01, 0.64, "The language model, with a low-rank update s · B A on its LM head", fontsize=13,
            weight="bold")
    ax.text(0.01, 0.595, "ordinary LoRA (lora): one A, B trained for every batch;  ChamaleonLLM: A, B written "
            "for each batch", fontsize=11, color=LORA)

    # 3. the two protocols: how the logits are scored
    low = 0.12
    box(ax, 0.27, low, "authors: what the authors' code computes\nright-pad with EOS to max_length; score only the last\n"
        "position, against the token at that same position;\nthe mean embedding counts the padding", width=0.44, height=0.17)
    box(ax, 0.75, low, "causal: the corrected protocol\nnext-token loss on every real token;\n"
        "padding masked out of attention, loss\nand the mean embedding", width=0.38, height=0.17)
    arrow(ax, (0.87, mid - H / 2 - 0.01), (0.80, low + 0.095), "loss")
    arrow(ax, (0.80, mid - H / 2 - 0.01), (0.40, low + 0.095))
    ax.text(0.01, 0.30, "Two protocols: every regime is scored under both", fontsize=13, weight="bold")
    return fig


def code_hash() -> str:
    """A short hash of this module's code: a committed figure drawn by older code is stale."""
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


def save(fig: plt.Figure, path: str | Path) -> Path:
    """Write the figure as a PNG stamped with code_hash(); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", dpi=100,
                metadata={"Software": None, "chameleon-plot": "pipeline_figure.draw", "chameleon-plot-hash": code_hash()})
    plt.close(fig)
    return path


def path() -> Path:
    """figures/pipeline.png in the checkout, or under $CHAMELEON_OUTPUTS when set (`make test`)."""
    return Path(os.environ.get("CHAMELEON_OUTPUTS") or ROOT) / "figures" / "pipeline.png"
