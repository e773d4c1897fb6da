"""Figures of the notebooks: one colour per regime everywhere, projector-sized fonts.

Every figure is saved by `save` as figures/<profile>/<name>.png with the data behind it
as figures/<profile>/<name>.csv, so a smoke run never touches another profile's figures.
Each PNG carries, in its metadata, the plotting function that drew it and a hash of that
function's code (`code_hash`): tests/test_notebooks.py fails when a committed figure is older
than the code that makes it.

    fig = loss_curves(runs, profile="smoke")   # runs: DataFrame from notebooks.histories
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from chameleon.config import ROOT, Config
from chameleon.regimes import CONDITIONINGS, NO_CONDITIONING, PROTOCOLS, REGIMES

# One colour per regime, in every figure (chameleon.regimes), and black for the paper's reported numbers.
# Protocols and conditionings draw their line styles, hatches and markers from their rows in
# chameleon.regimes (`conditioning_row`); panels follow the order of regimes.PROTOCOLS.
REGIME_COLOURS = {name: r.colour for name, r in REGIMES.items()}
# The conditioning labels that figures and tables leave out of a run's name: regimes without a
# hypernetwork ("-") and the hypernetwork's default conditioning (Config's, the paper's).
UNNAMED_CONDITIONINGS = (NO_CONDITIONING.name, Config.conditioning)
# Every conditioning row by its label, NO_CONDITIONING's "-" included (a dict: code_hash sees the styles).
CONDITIONING_ROWS = {**CONDITIONINGS, NO_CONDITIONING.name: NO_CONDITIONING}
STYLE = {"font.size": 14, "axes.titlesize": 16, "axes.labelsize": 14, "legend.fontsize": 12,
         "xtick.labelsize": 12, "ytick.labelsize": 12, "figure.dpi": 100, "savefig.dpi": 110,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}
plt.rcParams.update(STYLE)
# What each protocol scores when a row is scored as its protocol says (runs.scored_label): such rows need no tag
WHOLE = {p.scores for p in PROTOCOLS.values()}


def figures_dir(profile: str) -> Path:
    """figures/<profile>/ in the checkout, or under $CHAMELEON_OUTPUTS when set (`make test`)."""
    return Path(os.environ.get("CHAMELEON_OUTPUTS") or ROOT) / "figures" / profile


def code_hash(function: str) -> str:
    """A short hash of the code behind a figure: the source of the plotting function `function`,
    of every function of this module it calls (transitively, `save` included) and the values of
    the module's constants it reads (colours, styles). Editing another figure's function leaves it, and so does
    moving the module (its dunder names, such as its own __name__, are no drawing code)."""
    module, seen, parts = sys.modules[__name__], set(), []

    def visit(name: str) -> None:
        if name in seen or name.startswith("__") or not hasattr(module, name):
            return
        seen.add(name)
        value = getattr(module, name)
        if inspect.isfunction(value) and value.__module__ == __name__:
            parts.append(inspect.getsource(value))
            for used in value.__code__.co_names:
                visit(used)
        elif isinstance(value, (dict, tuple, list, str, int, float)):
            parts.append(f"{name} = {value!r}")

    for name in (function, "save", "STYLE"):
        visit(name)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def save(fig: plt.Figure, data: pd.DataFrame, name: str, profile: str) -> Path:
    """Write figures/<profile>/<name>.png and the data behind it as <name>.csv; returns the PNG path.

    The PNG's metadata names the plotting function that called `save` ("chameleon-plot") and the
    `code_hash` of its code ("chameleon-plot-hash")."""
    folder = figures_dir(profile)
    folder.mkdir(parents=True, exist_ok=True)
    caller = sys._getframe(1).f_code.co_name
    function = caller if inspect.isfunction(globals().get(caller)) else "save"
    fig.savefig(folder / f"{name}.png", bbox_inches="tight",
                metadata={"Software": None, "chameleon-plot": function, "chameleon-plot-hash": code_hash(function)})
    data.to_csv(folder / f"{name}.csv", index=False, float_format="%.6g")
    plt.close(fig)  # shown once, as the cell's value: no second copy from the inline backend
    return folder / f"{name}.png"


def regime_colour(regime: str) -> str:
    return REGIME_COLOURS.get(regime, "#CC79A7")


def conditioning_row(label: str):
    """The regimes.CONDITIONINGS row behind a results table's conditioning label; NO_CONDITIONING for
    the labels of regimes without a hypernetwork ("-", and the experts' "dispatch=...")."""
    return CONDITIONING_ROWS.get(label, NO_CONDITIONING)


def conditioning_tag(label: str) -> str:
    """The conditioning as a run's name shows it: "" for UNNAMED_CONDITIONINGS, else the label."""
    return "" if label in UNNAMED_CONDITIONINGS else label


def run_name(regime: str, conditioning: str, sep: str = " ") -> str:
    """"regime", or "regime<sep>(conditioning)" when the conditioning is named (`conditioning_tag`)."""
    tag = conditioning_tag(conditioning)
    return f"{regime}{sep}({tag})" if tag else regime


def protocols_in(table: pd.DataFrame) -> list[str]:
    """The protocols present in table["protocol"], in the order of regimes.PROTOCOLS."""
    present = set(table["protocol"])
    return [p for p in PROTOCOLS if p in present]


def padding_similarity(df: pd.DataFrame, profile: str, max_length: int | None = None) -> plt.Figure:
    """Bars: cosine(authors'-protocol, causal-protocol embedding) of each text against its real length.

    df columns: text (short label), real_tokens, cosine. The bars run from the shortest text to the
    longest; a text that fills max_length has no padding, and its bar reaches 1.0.
    """
    order = df.sort_values("real_tokens").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(range(len(order)), order["cosine"], color="#555555")  # grey: not a regime
    ax.bar_label(bars, fmt="%.2f")
    length = f" of {max_length}" if max_length else ""
    ax.set_xticks(range(len(order)), [f"{n}{length} tokens" for n in order["real_tokens"]])
    ax.set_ylim(min(0.0, order["cosine"].min() - 0.05), 1.1)
    ax.axhline(1.0, color="black", lw=1, ls=":")
    ax.set(title=f"Padding pulls short texts' embeddings apart ({profile} profile)",
           xlabel="real tokens in the text (the rest is padding)", ylabel="cosine(authors, causal embedding)")
    save(fig, order, "01_padding_similarity", profile)
    return fig


def cluster_sizes(labels, profile: str, batch_size: int | None = None, name: str = "02_cluster_sizes") -> plt.Figure:
    """Bar chart: examples per k-means cluster (a dashed line at batch_size, if given)."""
    counts = np.bincount(np.asarray(labels))
    data = pd.DataFrame({"cluster": np.arange(len(counts)), "examples": counts})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(data["cluster"], data["examples"], color="#555555")  # grey: not a regime
    ax.set_xticks(data["cluster"]) if len(counts) <= 30 else None
    ax.yaxis.get_major_locator().set_params(integer=True)
    if batch_size:
        ax.axhline(batch_size, color="black", ls="--", lw=1.5, label=f"batch_size = {batch_size}")
        ax.legend()
    ax.set(title=f"Examples per k-means cluster: k = {len(counts)}, N = {counts.sum()} ({profile} profile)",
           xlabel="cluster", ylabel="examples (count)")
    save(fig, data, name, profile)
    return fig


def umap_2d(emb, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """A deterministic 2-D UMAP (cosine metric) of the embeddings. The exact cosine neighbours (self first, as UMAP
    lists them) come from scikit-learn: UMAP's own search compiles numba code in every new process, about 6 s on
    2 cores even for a few dozen points."""
    import umap  # slow import (numba): only when a UMAP is drawn
    from sklearn.neighbors import NearestNeighbors

    emb = np.asarray(emb, dtype=np.float32)
    k = min(n_neighbors, len(emb) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(emb).kneighbors(emb)
    reducer = umap.UMAP(n_neighbors=k, metric="cosine", random_state=seed,
                        precomputed_knn=(idx, dist.astype(np.float32), None))
    with warnings.catch_warnings():  # without a search index UMAP cannot `transform` new points: never asked here
        warnings.filterwarnings("ignore", message="precomputed_knn")
        return reducer.fit_transform(emb)


KIND_MARKERS = ("o", "^", "s", "D")  # one marker per kind of example (e.g. paragraph / heading lines)
# One colour per kind of example (Paul Tol's indigo and sand: no regime's colour, told apart in grey print too).
KIND_COLOURS = ("#332288", "#DDCC77", "#882255", "#44AA99")


def umap_clusters(emb, labels, profile: str, seed: int = 0, name: str = "02_umap_clusters",
                  kinds=None, what: str = "examples", xy=None) -> plt.Figure:
    """Scatter of a 2-D UMAP of the example embeddings: colour and marker by kind, cluster ids at their centroids.

    Dozens of arbitrary cluster ids on a colour scale cannot be told apart, so the colour shows what a
    reader can tell apart, the kind of example (`kinds`, one label per example, e.g. "heading line" /
    "paragraph line"; one colour without it), and each k-means cluster's id is written at the median
    position of its members. `what` names the examples in the title ("train lines"); `xy` (n, 2) skips
    the UMAP (a redraw from the figure's CSV).
    """
    xy = umap_2d(emb, seed) if xy is None else np.asarray(xy)
    labels = np.asarray(labels)
    data = pd.DataFrame({"umap_1": xy[:, 0], "umap_2": xy[:, 1], "cluster": labels})
    data["kind"] = list(kinds) if kinds is not None else what
    k = len(np.unique(labels))
    fig, ax = plt.subplots(figsize=(9.5, 6.8))
    for (kind, pts), marker, colour in zip(data.groupby("kind", sort=True), KIND_MARKERS, KIND_COLOURS):
        ax.scatter(pts["umap_1"], pts["umap_2"], color=colour, s=36, alpha=0.8, marker=marker,
                   edgecolors="black", linewidths=0.3, label=f"{kind}s ({len(pts)})" if kinds is not None else None)
    for cluster, pts in data.groupby("cluster"):  # the id at the median of its members: the cluster's place
        ax.annotate(str(cluster), (pts["umap_1"].median(), pts["umap_2"].median()), ha="center", va="center",
                    fontsize=9 if k > 20 else 11, fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))
    if kinds is not None:
        ax.legend(loc="best", fontsize=11, title="kind of example")
    ax.set(title=f"UMAP of mean token embeddings, {len(data)} {what} ({profile} profile)\n"
                 f"numbers: the k-means cluster ids (k = {k}), each at the median of its members",
           xlabel="UMAP 1 (arbitrary units)", ylabel="UMAP 2 (arbitrary units)")
    save(fig, data, name, profile)
    return fig


def loss_curves(history: pd.DataFrame, profile: str, name: str, metric: str = "val_loss",
                note: str | None = None, min_span: float | None = 1.0) -> plt.Figure:
    """Validation loss (or any history column) during training: one colour per regime, one line style and
    marker per conditioning, so no two curves share both colour and style.

    history columns: regime, protocol, conditioning, epoch, and `metric`; optional step and scored (see
    runs.histories). One panel per protocol, since the two protocols score different tokens and their losses
    are not comparable. A run evaluated only before training (unadapted) is a dashed level line. Every curve
    and level line is one run at one scoring, and a panel holds one scoring (`scored`: the same run scored from
    token P is another number than scored on every token), so that a level line is scored on the tokens the
    curves beside it are: a history that mixes them is refused (ValueError), select one first. The x axis is
    the optimizer step where the history has one (a run evaluated every cfg.eval_every steps has several
    points an epoch), else the epoch. A loss panel spans at least `min_span` nats, so that a small difference
    does not fill the panel (None: matplotlib's own zoom); `note` is added to the title. The CSV holds the
    points drawn, one row each.
    """
    x = "step" if "step" in history else "epoch"
    keys = ["regime", "conditioning", *(["scored"] if "scored" in history else [])]
    # an evaluation at the epoch's last step and the epoch's own evaluation are one point (the same weights)
    drawn = history.dropna(subset=[metric]).drop_duplicates(
        subset=["protocol", *keys, *(["seed"] if "seed" in history else []), x], keep="last")
    if "scored" in drawn:
        scorings = drawn.groupby("protocol")["scored"].unique()
        mixed = {p: sorted(s) for p, s in scorings.items() if len(s) > 1}
        if mixed:
            raise ValueError(f"loss_curves: a panel would mix scorings {mixed}: its level lines and curves would "
                             "score different tokens; select one, e.g. history.query(\"scored in ['all', 'last']\")")
    protocols = protocols_in(drawn)
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.8), squeeze=False)
    label = {"val_loss": "validation loss (nats / token)", "val_ppl": "validation perplexity",
             "train_loss": "training loss (nats / token)"}.get(metric, metric)
    is_loss = "loss" in metric
    for ax, protocol in zip(axes[0], protocols):
        for (regime, cond, *_), run in drawn[drawn["protocol"] == protocol].groupby(keys, sort=False):
            tag, style = run_name(regime, cond), conditioning_row(cond)
            if run[x].nunique() == 1:  # nothing trained (unadapted): a level line
                ax.axhline(run[metric].iloc[0], color=regime_colour(regime), ls="--", lw=2, label=tag)
                continue
            ax.plot(run[x], run[metric], marker=style.marker, lw=2.5,
                    color=regime_colour(regime), ls=style.linestyle, label=tag)
        if is_loss:
            lo, hi = ax.get_ylim()
            if min_span and hi - lo < min_span:
                mid = (lo + hi) / 2
                lo, hi = mid - min_span / 2, mid + min_span / 2
            if lo < 0:  # a loss is never negative: the axis starts at 0 (and still spans min_span)
                lo, hi = 0.0, max(hi, min_span or 0.0)
            ax.set_ylim(lo, hi)
        scored = drawn.loc[drawn["protocol"] == protocol, "scored"].iloc[0] if "scored" in drawn else None
        on = {"last": ", last position", "all": ", every token"}.get(scored, f", scored {scored}" if scored else "")
        ax.set(title=f"{protocol} protocol{on}", xlabel="optimizer step" if x == "step" else "epoch", ylabel=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
    # one legend of every panel's runs, outside the panels, so that no curve hides behind it
    named = {}
    for ax in axes[0]:
        for handle, tag in zip(*ax.get_legend_handles_labels()):
            named.setdefault(tag, handle)
    axes[0][-1].legend(list(named.values()), list(named), bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=11)
    span = f"; each panel spans at least {min_span:g} nat" if is_loss and min_span else ""
    seeds = sorted(drawn["seed"].unique()) if "seed" in drawn else []
    which = f", single seed ({seeds[0]})" if len(seeds) == 1 else ""
    extra = f"\n{note}" if note else ""
    fig.suptitle(f"{label.split(' (')[0].capitalize()} during training ({profile} profile{which}{span}){extra}",
                 y=1.02 if not note else 1.07, fontsize=14)
    fig.tight_layout()
    save(fig, drawn, name, profile)
    return fig


def _ticks(n: int, most: int = 12) -> np.ndarray:
    """At most `most` evenly spaced positions out of n (all of them when n <= most)."""
    return np.arange(n) if n <= most else np.unique(np.linspace(0, n - 1, most).round().astype(int))


def adapter_norms(norms: pd.DataFrame, similarity: pd.DataFrame, profile: str,
                  name: str = "05_adapter_norms") -> plt.Figure:
    """Left: Frobenius norms of the generated A, B and update per cluster (dots on a log axis); right: how much the updates
    scaling * B @ A of two clusters differ in direction, 1 - cosine similarity, on a log colour scale
    fit to the data (the cosines are often all within 0.01 of 1, which a -1..1 scale shows as one block).

    norms columns: cluster, norm_A, norm_B, norm_update; similarity: square, clusters on both axes.
    Neutral greys, not regime colours: these are parts of one adapter, not regimes.
    """
    from matplotlib.colors import LogNorm

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.4), gridspec_kw={"width_ratios": [1.3, 1]})
    x = np.arange(len(norms))
    for col, colour, marker in [("norm_A", "#b0b0b0", "s"), ("norm_B", "#707070", "^"), ("norm_update", "#202020", "o")]:
        left.plot(x, norms[col], ls="", marker=marker, markersize=7, color=colour, label=col.replace("norm_", "‖") + "‖")
    ticks = _ticks(len(norms))
    left.set_xticks(ticks, norms["cluster"].to_numpy()[ticks])
    left.set_yscale("log")  # dots, not bars: a bar on a log axis starts at an arbitrary base
    left.set(title=f"Generated adapter size per cluster ({profile} profile)", xlabel="cluster",
             ylabel="Frobenius norm (log scale)")
    left.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.1), frameon=False)
    dist = 1 - similarity.to_numpy().astype(float)
    off = dist[~np.eye(len(dist), dtype=bool)]
    lo, hi = (max(off[off > 0].min(), 1e-9), max(off.max(), 1e-8)) if (off > 0).any() else (1e-9, 1e-8)
    shown = np.where(np.eye(len(dist), dtype=bool), np.nan, np.clip(dist, lo, None))  # the diagonal is 0 by definition
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    im = right.imshow(shown, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.01)), cmap=cmap)
    ticks = _ticks(len(similarity))
    right.set_xticks(ticks, similarity.columns.to_numpy()[ticks])
    right.set_yticks(ticks, similarity.index.to_numpy()[ticks])
    right.grid(False)
    right.set(title=f"How the updates differ: 1 - cosine\n(cosine {similarity.to_numpy()[~np.eye(len(dist), dtype=bool)].min():.4f} "
                    f"to {similarity.to_numpy()[~np.eye(len(dist), dtype=bool)].max():.4f}; diagonal blank)",
              xlabel="cluster", ylabel="cluster")
    fig.colorbar(im, ax=right, label="1 - cosine similarity (log scale)")
    fig.tight_layout()
    save(fig, norms.merge(similarity.rename(columns=lambda c: f"cos_{c}"), left_on="cluster",
                          right_index=True), name, profile)
    return fig


def _after_prefix(part: pd.DataFrame) -> pd.Series:
    """Rows whose loss counts only the tokens after the prefix (see runs.scored_label): without a
    `scored` column, those whose conditioning embeds a prefix under a protocol that scores every token."""
    if "scored" in part:
        return part["scored"].astype(str).str.startswith("from")
    return pd.Series([conditioning_row(c).prefix and PROTOCOLS[p].scores_every_token
                      for c, p in zip(part["conditioning"], part["protocol"])], index=part.index, dtype=bool)


def results_bars(table: pd.DataFrame, profile: str, name: str = "06_results", source: str | None = None) -> plt.Figure:
    """Final validation loss and perplexity per regime (and conditioning), one panel row per protocol,
    mean with error bars (standard deviation over seeds) when the table has more than one seed.

    table columns: regime, protocol, conditioning, val_loss, val_ppl; optional val_loss_std,
    val_ppl_std, seeds and scored (a compare() table). Rows scored only after the prefix (the `prefix`
    rows under the causal protocol, and baselines scored on their tokens: `scored` "from P") are drawn
    apart, after a gap and a dashed line; under the authors' protocol every row scores the last
    position. `source` names the data in the title.
    """
    protocols = protocols_in(table)
    seeds = int(table["seeds"].min()) if "seeds" in table else 1
    fig, axes = plt.subplots(len(protocols), 2, figsize=(15, 4.6 * len(protocols) + 0.6), squeeze=False)
    for row, protocol in zip(axes, protocols):
        part = table[table["protocol"] == protocol]
        part = pd.concat([part[~_after_prefix(part)], part[_after_prefix(part)]]).reset_index(drop=True)
        apart = _after_prefix(part)
        x = np.arange(len(part)) + np.where(apart, 0.8, 0.0)
        tags = [run_name(r, c, "\n") for r, c in zip(part["regime"], part["conditioning"])]
        for ax, metric, label in zip(row, ("val_loss", "val_ppl"), ("loss (nats / token)", "perplexity")):
            err = part[f"{metric}_std"].fillna(0) if seeds > 1 and f"{metric}_std" in part else None
            bars = ax.bar(x, part[metric], yerr=err, capsize=5, color=[regime_colour(r) for r in part["regime"]],
                          edgecolor="white", error_kw={"elinewidth": 1.5})
            for bar, cond in zip(bars, part["conditioning"]):
                bar.set_hatch(conditioning_row(cond).hatch)
            ax.set_xticks(x, tags, rotation=30, ha="right", fontsize=11)
            ax.bar_label(bars, fmt="%.3g", fontsize=10, padding=2)
            if apart.any():
                sep = x[apart].min() - 0.9
                ax.axvline(sep, color="black", ls="--", lw=1)
                ax.text(sep + 0.1, 0.97, "scored after the\nprefix: compare\nwithin this side", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=10)
            ax.set(title=f"{protocol} protocol: validation {label.split(' (')[0]}", ylabel=f"validation {label}")
            if metric == "val_ppl" and part[metric].max() / max(part[metric].min(), 1e-9) > 50:
                ax.set_yscale("log")
                ax.set_ylabel(f"validation {label} (log scale)")
            lo, hi = ax.get_ylim()  # headroom for the labels above the bars
            ax.set_ylim(lo, hi * 6 if ax.get_yscale() == "log" else hi * 1.3)
    what = f"mean ± std over {seeds} seeds" if seeds > 1 else "a single seed (no error bars)"
    fig.suptitle(f"Final validation metrics, {profile} profile: {what}" + (f"\n{source}" if source else ""), fontsize=15)
    fig.tight_layout()
    save(fig, table, name, profile)
    return fig


# The publication's authors'-protocol losses (chameleon.experiments.compare.PAPER_TABLE), marked in black where the kit's runs
# are set beside them.
PUBLISHED_LOSSES = {"unadapted": 10.25, "lora": 1.35, "chameleon": 0.375}


def paper_length(table: pd.DataFrame, profile: str, name: str = "06_paper_length", source: str | None = None) -> plt.Figure:
    """The authors'-protocol loss at the paper's lengths, split into what the pad targets and the real targets
    contribute: loss = p_pad · L_pad + (1 - p_pad) · L_real, one stacked bar per run, one panel per max_length,
    with the publication's 10.25 / 1.35 / 0.375 marked (black).

    table columns: regime, conditioning, max_length, val_loss, val_loss_pad, val_loss_real (NaN where no target
    is real), pad_share (a compare() table of `--experiment paper-length`, means over seeds).
    """
    lengths = sorted(table["max_length"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(7.5 * len(lengths), 6.2), squeeze=False, sharey=True)
    rows = []
    for ax, length in zip(axes[0], lengths):
        part = table[table["max_length"] == length].reset_index(drop=True)
        pad = part["pad_share"] * part["val_loss_pad"]
        real = (1 - part["pad_share"]) * part["val_loss_real"].fillna(0)
        x = np.arange(len(part))
        colours = [regime_colour(r) for r in part["regime"]]
        ax.bar(x, pad, color=colours, edgecolor="black", lw=0.6, hatch="//", label="pad targets: p_pad · L_pad")
        ax.bar(x, real, bottom=pad, color=colours, edgecolor="black", lw=0.6, alpha=0.45,
               label="real targets: (1 - p_pad) · L_real")
        for i, row in part.iterrows():  # the numbers, in one row clear of the bars and the paper's lines
            real_text = "–" if pd.isna(row["val_loss_real"]) else f"{row['val_loss_real']:.2f}"
            ax.text(i, 6.0, f"loss\n{row['val_loss']:.2f}\n\nL_pad\n{row['val_loss_pad']:.0e}\n\nL_real\n{real_text}",
                    ha="center", va="center", fontsize=9)
        for regime, loss in PUBLISHED_LOSSES.items():  # the publication's numbers: black, named in the right margin
            ax.axhline(loss, color="black", ls="--", lw=1.2)
            if length == lengths[-1]:
                ax.text(1.01, loss, f"paper, {run_name(regime, '-')}: {loss:g}", transform=ax.get_yaxis_transform(),
                        ha="left", va="center", fontsize=10)
        ax.set_xticks(x, [run_name(r, c, "\n") for r, c in zip(part["regime"], part["conditioning"])], rotation=30,
                      ha="right", fontsize=10)
        ax.set(title=f"max_length {length}: p_pad = {part['pad_share'].iloc[0]:.3f}",
               ylabel="authors'-protocol validation loss (nats)" if length == lengths[0] else None)
        ax.set_ylim(0, 11.2)
        rows.append(part.assign(loss_from_pad=pad, loss_from_real=real))
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(0, 0.9), fontsize=10)
    fig.suptitle(f"Where the authors'-protocol loss comes from at the paper's lengths ({profile} profile)"
                 + (f"\n{source}" if source else ""), fontsize=14)
    fig.tight_layout()
    save(fig, pd.concat(rows, ignore_index=True), name, profile)
    return fig


def pad_share_by_length(table: pd.DataFrame, profile: str, name: str = "03_pad_share") -> plt.Figure:
    """The authors' protocol against max_length, for the unadapted model: left, the share of scored targets
    that are the pad token; right, the validation loss (the mean over lines of the last position's loss).

    table columns: max_length, pad_share (0-1), val_loss; one row per length (analysis.paper_last_position
    at each length gives both). Grey: one model, no regime.
    """
    data = table.sort_values("max_length").reset_index(drop=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, column, fmt, ylabel in ((left, "pad_share", "{:.0%}", "pad targets (share of scored lines)"),
                                    (right, "val_loss", "{:.2f}", "validation loss (nats, last position)")):
        ax.plot(data["max_length"], data[column], "o-", color="#555555", lw=2.5, markersize=8)
        for x, v in zip(data["max_length"], data[column]):
            ax.annotate(fmt.format(v), (x, v), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(data["max_length"], [str(n) for n in data["max_length"]])
        ax.minorticks_off()
        ax.set(xlabel="max_length (tokens; right-padded)", ylabel=ylabel)
    left.set_ylim(0, 1.15)
    left.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    right.set_ylim(0, data["val_loss"].max() * 1.2)
    left.set_title("Longer max_length: more of the scored\ntargets are the pad token")
    right.set_title("The loss follows the padding,\nnot the text")
    fig.suptitle(f"The authors' protocol, unadapted model, {len(data)} lengths ({profile} profile)", y=1.03, fontsize=14)
    fig.tight_layout()
    save(fig, data, name, profile)
    return fig


def loss_rouge(table: pd.DataFrame, profile: str, name: str, source: str | None = None) -> plt.Figure:
    """Validation loss against ROUGE-L of the greedy answers, one point per run, one panel per protocol (their
    losses score different tokens): colour by regime, marker by conditioning (one legend names the runs, as
    close points would hide each other's names), error bars (std over seeds) where the table has val_loss_std
    and rouge_l_std. A lower loss further left is a better answer only if the point is also higher.

    table columns: regime, protocol, conditioning, val_loss, rouge_l; optional scored, seed, val_loss_std,
    rouge_l_std, seeds (a compare() table of the instructions task).
    """
    protocols = protocols_in(table)
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 5.2), squeeze=False)
    named = {}
    for ax, protocol in zip(axes[0], protocols):
        part = table[table["protocol"] == protocol]
        for _, row in part.iterrows():
            style = conditioning_row(row["conditioning"])
            drawn = ax.errorbar(row["val_loss"], row["rouge_l"], xerr=row.get("val_loss_std"),
                                yerr=row.get("rouge_l_std"), fmt=style.marker, markersize=10,
                                color=regime_colour(row["regime"]), markeredgecolor="black", ecolor="#999999",
                                elinewidth=1.5, capsize=4, alpha=0.9)
            named.setdefault(run_name(row["regime"], row["conditioning"]), drawn)
        ax.set(title=f"{protocol} protocol", xlabel="validation loss (nats / token; lower is better)",
               ylabel="ROUGE-L of the greedy answers (higher is better)")
    fig.legend(list(named.values()), list(named), loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=11)
    seeds = int(table["seeds"].min()) if "seeds" in table else 1
    what = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed, no error bars"
    fig.suptitle(f"Lower loss is not better answers: loss against ROUGE-L ({profile} profile, {what})"
                 + (f"\n{source}" if source else ""), fontsize=14, y=1.02 if not source else 1.06)
    fig.tight_layout()
    save(fig, table, name, profile)
    return fig


def paired_forest(paired: pd.DataFrame, profile: str, name: str, title: str, source: str | None = None) -> plt.Figure:
    """A forest plot: one paired difference (run - reference, same seeds) per row with its 95% interval,
    filled where the drawn interval excludes 0, hollow where it does not; a row whose interval excludes 0 but
    whose `significant` is False (a claim of a family corrected by Holm, as the domains experiment's) says
    "n.s. after Holm" beside it. A legend names the colours (the regime of the row's run) and the fill.

    paired columns: difference, low, high, significant, and label (the row's name) or the keys of
    report.paired_differences (regime, conditioning, scored, reference); optional regime (its colour)
    and `group`, which starts a new block of rows with its name as a header. The CSV adds `filled`.
    """
    data = paired.reset_index(drop=True).copy()
    if "label" not in data:
        data["label"] = [f"{run_name(r, c)}{'' if s in WHOLE or pd.isna(s) else f' [{s}]'} - {ref}"
                         for r, c, s, ref in zip(data["regime"], data["conditioning"],
                                                 data.get("scored", pd.Series([None] * len(data))), data["reference"])]
    groups = data["group"] if "group" in data else pd.Series([""] * len(data))
    y, pos, headers = 0.0, [], []
    for i, g in enumerate(groups):
        if g and (i == 0 or g != groups[i - 1]):
            headers.append((y, g))
            y += 1
        pos.append(y)
        y += 1
    from matplotlib.lines import Line2D

    data["filled"] = (data["low"] > 0) | (data["high"] < 0)  # the interval drawn excludes 0
    corrected = data["filled"] & ~data["significant"].astype(bool)  # excludes 0, yet not a finding after Holm
    colours = [regime_colour(r) if pd.notna(r) else "#333333" for r in data.get("regime", pd.Series([None] * len(data)))]
    fig, ax = plt.subplots(figsize=(11, 0.42 * y + 1.8))
    for p, (i, row), colour in zip(pos, data.iterrows(), colours):
        ax.plot([row["low"], row["high"]], [p, p], color=colour, lw=2.5)
        ax.plot(row["difference"], p, "o", markersize=9, color=colour, markeredgecolor="black",
                markerfacecolor=colour if row["filled"] else "white")
        if corrected[i]:
            ax.annotate("n.s. after Holm", (max(row["high"], 0), p), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=9, style="italic")
    for p, g in headers:
        ax.text(0.0, p, g, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=12, fontweight="bold")
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(pos, data["label"], fontsize=10)
    ax.set_ylim(y - 0.5, -0.7)
    ax.grid(axis="y", visible=False)
    # the legend: the colours (the row's regime), then the fill; under the figure, so that it hides no interval
    regimes = dict(zip(data["regime"], colours)) if "regime" in data else {}
    handles = [Line2D([], [], color=c, lw=2.5, marker="o", markersize=8, markeredgecolor="black", label=r)
               for r, c in regimes.items() if pd.notna(r)]
    handles += [Line2D([], [], ls="", marker="o", markersize=8, color="#888888", markeredgecolor="black",
                       markerfacecolor=f, label=t) for f, t in (("#888888", "interval excludes 0"),
                                                               ("white", "interval includes 0"))]
    ax.set(xlabel="paired difference in validation loss (nats / token), 95% interval\n"
                  "< 0: lower loss than the reference; filled: the interval excludes 0, hollow: it does not"
                  + ("\n\"n.s. after Holm\": excludes 0, but not significant once its family is corrected" if corrected.any() else ""),
           title=title + (f"\n{source}" if source else ""))
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(handles), 4), fontsize=10,
               title="colour: the regime of the row's run; fill: its interval")
    save(fig, data, name, profile)
    return fig


def svf_comparison(table: pd.DataFrame, profile: str, name: str = "08_svf_results", source: str | None = None) -> plt.Figure:
    """ChamaleonLLM, LoRA and Transformer²'s SVF experts side by side: final validation loss (mean, error bar =
    std over seeds, drawn in grey so that it shows on a black bar) as horizontal bars, one panel per protocol,
    each bar marked with its trainable parameters and its forward passes per request.

    table columns: regime, protocol, conditioning, trainable_params, val_loss; optional val_loss_std and
    passes (NaN: one pass; a hypernetwork head adds one MLP call per group, not a pass).
    """
    protocols = protocols_in(table)
    n = table.groupby("protocol").size().max()
    fig, axes = plt.subplots(1, len(protocols), figsize=(8 * len(protocols), 0.62 * n + 2.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        part = table[table["protocol"] == protocol].reset_index(drop=True)
        y = np.arange(len(part))
        err = part["val_loss_std"].fillna(0) if "val_loss_std" in part else None
        ax.barh(y, part["val_loss"], xerr=err, color=[regime_colour(r) for r in part["regime"]],
                       edgecolor="white", error_kw={"ecolor": "#999999", "elinewidth": 2.5, "capsize": 5, "capthick": 2})
        passes = part["passes"].fillna(1).astype(int) if "passes" in part else pd.Series(1, index=part.index)
        for i, row in part.iterrows():
            k = int(passes[i])
            extra = " + hypernetwork" if row["regime"] in REGIMES and REGIMES[row["regime"]].conditioned else ""
            end = row["val_loss"] + (0 if err is None else err[i])  # right of the error bar
            ax.annotate(f"{row['val_loss']:.2f}  |  {int(row['trainable_params']):,} params, {k} pass{'es' if k > 1 else ''}{extra}",
                        (end, i), xytext=(6, 0), textcoords="offset points", va="center", fontsize=10)
        ax.set_yticks(y, [run_name(r, c) for r, c in zip(part["regime"], part["conditioning"])], fontsize=11)
        ax.invert_yaxis()
        ax.set_xlim(0, part["val_loss"].max() * 1.9)
        ax.grid(axis="y", visible=False)
        ax.set(title=f"{protocol} protocol", xlabel="validation loss (nats / token)")
    seeds = int(table["seeds"].min()) if "seeds" in table else 1
    fig.suptitle(f"Final validation loss, {profile} profile ({'mean ± std over %d seeds' % seeds if seeds > 1 else 'one seed'});"
                 " trainable parameters and forward passes per request" + (f"\n{source}" if source else ""), fontsize=14)
    fig.tight_layout()
    save(fig, table, name, profile)
    return fig


def domains_comparisons(table: pd.DataFrame, pairs: list[tuple[str, str]], batchings: tuple[str, ...],
                        profile: str, name: str = "domains_comparisons") -> Path:
    """A forest plot of the `domains` experiment's claimed differences (first - second) under each batching,
    with the paired bootstrap intervals over lines (chameleon.experiments.domains.comparisons gives the table)."""
    labels = [f"{f} - {s}" for f, s in pairs]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.2))
    shown = []
    for j, b in enumerate(batchings):
        part = table[table.batching == b].set_index(["first", "second"])
        for i, (f, s) in enumerate(pairs):
            if (f, s) in part.index:
                c = part.loc[(f, s)]
                ax.errorbar(c.difference, i + (j - 1) * 0.22, fmt="os^"[j % 3], color=KIND_COLOURS[j % 4],
                            xerr=[[c.difference - c.boot_low], [c.boot_high - c.difference]], capsize=2,
                            label=b if not any(r["batching"] == b for r in shown) else None)
                shown.append({"batching": b, "comparison": labels[i], "difference": c.difference,
                              "low": c.boot_low, "high": c.boot_high})
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("difference in val loss (nats / token), 95% bootstrap over lines; < 0: first is better")
    ax.legend(title="batching", loc="best", fontsize=8)
    return save(fig, pd.DataFrame(shown), name, profile)


def control_diagnostics(table: pd.DataFrame, profile: str, name: str = "diagnostics") -> Path:
    """What the hypernetwork reads and writes, per conditioned row (colour) and recipe (group): a probe's accuracy
    at telling the domain from its input, and the relative spread of its generated update across domains (log
    scale); chameleon.experiments.domains_control.diagnose gives the table."""
    rows = list(dict.fromkeys(table.row))
    recipes = list(dict.fromkeys(table.label))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(recipes) * len(rows) / 2 + 2), sharey=True)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        part = table[table.row == row].set_index("label").reindex(recipes)
        y = np.arange(len(recipes)) + (i - (len(rows) - 1) / 2) * width
        colour = KIND_COLOURS[i % len(KIND_COLOURS)]
        axes[0].barh(y, part.probe_accuracy, height=width, color=colour, label=row)
        axes[1].barh(y, part.spread_domains, height=width, color=colour)
    axes[0].set_yticks(range(len(recipes)), recipes)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("probe accuracy: the line's domain\nfrom the hypernetwork's input (held-out lines)")
    axes[0].axvline(1 / table.domains.iloc[0], color="grey", lw=0.8, ls=":")
    axes[1].set_xscale("log")
    axes[1].set_xlim(left=1e-3)  # a constant input moves nothing (about 1e-7, rounding): off the axis
    axes[1].set_xlabel("spread of the generated update across domains,\nrelative to its mean (log; constant: ~0)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(rows), fontsize=8,
               bbox_to_anchor=(0.5, -0.2))
    return save(fig, table, name, profile)


def line_costs(points: pd.DataFrame, profile: str, name: str = "lines") -> Path:
    """Loss against head adapters applied per 1,000 lines on `kmeans` batches, one point per row (batch, k-means
    group, line); chameleon.experiments.domains_control.report gives the table (row, adapters, loss, sd). Rows at
    the same cost are spread a little sideways (the axis is log: a few percent), so that their bars stay apart."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cost = points.adapters.round()
    nth, count = points.groupby(cost).cumcount(), cost.map(cost.value_counts())
    xs = points.adapters * 1.04 ** (nth - (count - 1) / 2)
    for i, (x, r) in enumerate(zip(xs, points.itertuples())):
        colour = plt.cm.tab10(i % 10)  # one colour per row (KIND_COLOURS has four)
        ax.errorbar(x, r.loss, yerr=r.sd, fmt="o", color=colour, capsize=3, label=r.row)
    ax.set_xscale("log")
    ticks = sorted(set(cost))
    ax.set_xticks(ticks, [f"{t:,.0f}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
    ax.set_xlabel("head adapters applied per 1,000 validation lines (`kmeans` batches)")
    ax.set_ylabel("validation loss (nats / token)\nmean ± sd over seeds")
    ax.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.tight_layout()
    return save(fig, points, name, profile)
