"""Paired statistics, one module for every table: differences over seeds (t-interval, t-test), a paired bootstrap
over validation lines, Holm's correction, the smallest detectable difference and the equivalence interval (TOST).

    per_seed = run_metric - reference_metric               # one number per seed, same seeds
    mean, low, high, sd = t_interval(per_seed)             # mean ± t * sd / sqrt(n)
    c = paired(lines, "chameleon_prefix", "chameleon_constant", "kmeans")   # from per-line losses
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

BOOTSTRAP = 2000  # resamples of the validation lines


def t_interval(per_seed: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, sd) of per-seed differences: mean ± t_{(1+level)/2, n-1} * sd / sqrt(n)."""
    n, mean = len(per_seed), float(np.mean(per_seed))
    sd = float(np.std(per_seed, ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd


def paired(lines: pd.DataFrame, first: str, second: str, batching: str, seed: int = 0) -> dict | None:
    """first - second in token-weighted val loss from per-line losses (row, seed, line, tokens, loss_<batching>):
    per seed (t-interval and t-test over the seeds both rows have), and a paired bootstrap over lines (the same
    resampled lines for both rows and every seed). None with fewer than 2 shared seeds."""
    col = f"loss_{batching}"
    a = lines[lines.row == first].pivot(index="line", columns="seed", values=col)
    b = lines[lines.row == second].pivot(index="line", columns="seed", values=col)
    seeds = sorted(set(a.columns) & set(b.columns))
    if len(seeds) < 2:
        return None
    tokens = lines[lines.row == first].groupby("line").tokens.first().loc[a.index].to_numpy(float)
    diff = (a[seeds] - b[seeds]).to_numpy()  # (lines, seeds) summed nats
    mean, low, high, sd = t_interval(diff.sum(0) / tokens.sum())
    p = float(stats.ttest_1samp(diff.sum(0) / tokens.sum(), 0).pvalue) if sd > 0 else 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tokens), (BOOTSTRAP, len(tokens)))
    boot = diff.mean(1)[idx].sum(1) / tokens[idx].sum(1)
    return dict(first=first, second=second, batching=batching, seeds=len(seeds), difference=mean, sd=sd, t_low=low,
                t_high=high, p_seeds=p, boot_low=float(np.quantile(boot, 0.025)),
                boot_high=float(np.quantile(boot, 0.975)))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family."""
    order = np.argsort(p)
    adjusted = np.empty(len(p))
    adjusted[order] = np.minimum(1, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    return adjusted


def detectable(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference a two-sided paired t-test over n seeds detects with `power` at level `alpha`, when
    the per-seed differences spread with standard deviation `sd`."""
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def tost(c: pd.Series | dict) -> tuple[float, float]:
    """The 90% seed interval of a `paired` difference: inside ±margin, both one-sided tests reject at 5% (TOST)."""
    half = float(stats.t.ppf(0.95, c["seeds"] - 1)) * c["sd"] / math.sqrt(c["seeds"])
    return c["difference"] - half, c["difference"] + half
