"""What only the notebooks compute and show: analyses of the method on real examples, and the
formatting of their tables and texts. The method itself lives in its own modules (embeddings,
objectives, hypernetwork, ...); nothing here is used by training, evaluation or serving.

    effect = padding_effect(model, tokenizer, texts, max_length=64)   # notebook 01
    print(side_by_side(generations(finished_runs(cfg))))               # notebook 07
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from chameleon.data import tokenize
from chameleon.embeddings import embedding_mask, mean_embeddings
from chameleon.instructions import response_start
from chameleon.objectives import IGNORE, targets
from chameleon.regimes import PROTOCOLS, conditioning_label


# --- what padding does to the embedding (notebook 01) ---

def padding_effect(model, tokenizer, texts: list[str], max_length: int) -> pd.DataFrame:
    """Cosine similarity between the authors'-protocol (padding counted) and causal-protocol
    (real tokens only) mean embedding of each text."""
    enc = tokenize(texts, tokenizer, max_length)
    padded, real_only = (mean_embeddings(model, enc["input_ids"], embedding_mask(enc["attention_mask"], p))
                         for p in sorted(PROTOCOLS, key=lambda p: not PROTOCOLS[p].embeds_padding))
    real = enc["attention_mask"].sum(1)
    return pd.DataFrame({"text": [t[:50] for t in texts], "real_tokens": real.tolist(),
                         "padding_tokens": (max_length - real).tolist(),
                         "cosine": (padded * real_only).sum(1).numpy().round(3)})


def pair_similarity(model, tokenizer, a: str, b: str, max_length: int) -> dict[str, float]:
    """Cosine similarity of the mean embeddings of texts a and b under each protocol."""
    enc = tokenize([a, b], tokenizer, max_length)
    out = {}
    for protocol in PROTOCOLS:
        e = mean_embeddings(model, enc["input_ids"], embedding_mask(enc["attention_mask"], protocol))
        out[protocol] = round(float(e[0] @ e[1]), 3)
    return out


# --- what each protocol scores, shown on real examples (notebooks 03 and 07) ---

@torch.no_grad()
def paper_last_position(model, tokenizer, split) -> pd.DataFrame:
    """Per validation example under the authors' protocol: the token at the last position (the
    target), whether it is the pad token, the model's loss on it and its top prediction."""
    hidden = model.base_model(input_ids=split.input_ids, attention_mask=split.attention).last_hidden_state[:, -1]
    logits = model.get_output_embeddings()(hidden)
    target = split.input_ids[:, -1]
    return pd.DataFrame({"target": tokenizer.convert_ids_to_tokens(target.tolist()),
                         "target_is_pad": (target == tokenizer.pad_token_id).tolist(),
                         "loss": F.cross_entropy(logits, target, reduction="none").double().numpy(),
                         "predicted": tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())})


def scored_tokens(prompt: str, response: str, tokenizer, max_length: int) -> pd.DataFrame:
    """Which positions of one instruction example each protocol scores, and against which token.

    The example is encoded as training encodes it (prompt + response + EOS, right-padded to
    max_length, loss from the first response token on). One row per position that either
    protocol scores: its token, and the target of the hidden state there ("" if not scored).
    """
    enc = tokenize([prompt + response + tokenizer.eos_token], tokenizer, max_length)
    start = response_start([prompt], tokenizer)
    show = lambda ids: [repr(tokenizer.decode([i])) for i in ids]  # noqa: E731
    tokens = show(enc["input_ids"][0].tolist())
    cols = {}
    for protocol in sorted(PROTOCOLS, key=lambda p: PROTOCOLS[p].scores_padding):  # every real token first
        t = targets(enc["input_ids"], enc["attention_mask"], protocol, start)[0]
        cols[protocol] = ["" if v == IGNORE else s for v, s in zip(t.tolist(), show(t.clamp(min=0).tolist()))]
    rows = [{"position": i, "token": tokens[i], **{f"{p} target": col[i] for p, col in cols.items()}}
            for i in range(len(tokens)) if any(col[i] for col in cols.values())]
    return pd.DataFrame(rows)


# --- what the hypernetwork generates (notebook 05) ---

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


# --- tables and texts of the notebooks ---

def cluster_examples(texts: list[str], labels, per_cluster: int = 2, width: int = 90) -> pd.DataFrame:
    """The first `per_cluster` texts of each cluster, cut to `width` characters."""
    rows = [{"cluster": int(c), "text": texts[i][:width]}
            for c in np.unique(labels) for i in np.flatnonzero(np.asarray(labels) == c)[:per_cluster]]
    return pd.DataFrame(rows)


def beside_paper(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The paper's table beside this kit's rows of one protocol (a compare() table; batch_mean
    conditioning for the hypernetwork: the rows whose conditioning plots.UNNAMED_CONDITIONINGS leaves unnamed)."""
    from chameleon.experiments.compare import PAPER_TABLE
    from chameleon.experiments.plots import UNNAMED_CONDITIONINGS

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

    from chameleon.experiments.plots import run_name

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
