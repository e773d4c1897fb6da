"""The paper's generation metrics of an instruction run: greedy answers to validation prompts, and their BLEU,
ROUGE-L and METEOR against the references.

    result = generation_metrics(adapted, val_split, cfg, tokenizer)
    result["bleu"], result["rouge_l"], result["meteor"], result["generations"]

Metrics (all on a 0-100 scale):
- BLEU: sacrebleu's corpus BLEU (13a tokenisation), the standard the paper's `evaluate`
  "bleu" approximates; it is 0 whenever no 4-gram matches, common for short outputs.
- ROUGE-L: rouge_score's F-measure with Porter stemming, averaged over examples.
- METEOR: METEOR 1.5 (Denkowski & Lavie; exact, stem, WordNet-synonym and paraphrase
  matching), run from the jar and English data that the PyPI package `pycocoevalcap`
  ships, which needs `java`. One METEOR process (pycocoevalcap's `Meteor`, 1 GB) starts on the
  first call, about 6 s to load its paraphrase table, and serves every later call of the
  Python process in milliseconds. nltk's METEOR (what the paper's
  `evaluate.load("meteor")` uses) needs the WordNet corpus, which nltk downloads and no PyPI
  package ships in nltk's format, so it cannot run offline. Where pycocoevalcap or java is
  missing, "meteor" is None and "meteor_unavailable" says why. Its numbers are METEOR 1.5's,
  not nltk's approximation of it.
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

import torch

from chameleon.clustering import eval_batches
from chameleon.config import Config
from chameleon.prepare import load_split_texts
from chameleon.serve.decoding import generate


def bleu(outputs: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU, 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(outputs, [references]).score)


def rouge_l_scores(outputs: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure (Porter-stemmed) of each output against its reference, 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, out)["rougeL"].fmeasure for out, ref in zip(outputs, references, strict=True)]


def rouge_l(outputs: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (Porter-stemmed), 0-100."""
    scores = rouge_l_scores(outputs, references)
    return 100.0 * sum(scores) / max(len(scores), 1)


def meteor_jar() -> tuple[Path | None, str]:
    """pycocoevalcap's METEOR 1.5 jar and why it cannot run (empty when it can)."""
    spec = importlib.util.find_spec("pycocoevalcap")  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None, "METEOR needs the PyPI package pycocoevalcap (METEOR 1.5 jar + English data); it is not installed"
    jar = Path(list(spec.submodule_search_locations)[0]) / "meteor" / "meteor-1.5.jar"
    if not jar.is_file():
        return None, f"pycocoevalcap has no {jar.name}"
    if shutil.which("java") is None:
        return None, "METEOR 1.5 is a Java program and no `java` is on PATH (apt-get install default-jre-headless)"
    return jar, ""


@functools.cache
def _meteor_process():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def meteor(outputs: list[str], references: list[str]) -> float | None:
    """METEOR 1.5 corpus score, 0-100, or None when it cannot run here (see `meteor_jar`)."""
    if meteor_jar()[0] is None:
        return None
    # one segment per line in METEOR's protocol: a newline inside a text would shift every later segment
    flat = lambda texts: {i: [" ".join(t.split())] for i, t in enumerate(texts)}  # noqa: E731
    score, _ = _meteor_process().compute_score(flat(references), flat(outputs))
    return 100.0 * score


def generation_metrics(adapted, split, cfg: Config, tokenizer, texts: dict | None = None) -> dict:
    """Greedy outputs for the first cfg.n_generate examples of `split`, and their BLEU / ROUGE-L / METEOR.

    Args:
        adapted: the trained `regimes.Adapted`.
        split: the `prepare.Split` the examples come from (its labels and cond_emb condition
            a ChameleonLLM head).
        cfg: max_new_tokens, n_generate, max_length, batch_size and conditioning are read.
        tokenizer: the backbone's tokenizer.
        texts: `instructions.texts` of the split's records in the split's order; None loads them.

    Returns:
        dict(bleu, rouge_l, meteor (None if unavailable), n, generations: a list of
        {instruction, input, reference, output}), plus meteor_unavailable when METEOR is None.
    """
    if texts is None:
        texts = load_split_texts(cfg, split.name, tokenizer)
    n = min(cfg.n_generate, len(split))
    # each example is conditioned and dispatched as in evaluation, by its validation batch
    batches = [(batch, cond_batch) for batch, cond_batch in eval_batches(split.labels, cfg.batch_size, cfg.conditioning)
               if min(batch) < n]
    # one decoding batch for all, one group per validation batch (its conditioning vector, its expert), or one
    # decoding batch per validation batch where the body differs between them
    passes = [[b] for b in batches] if adapted.body_per_group else [batches]
    outputs: list[str] = [""] * n
    for part in passes:
        selections = []
        for batch, _ in part:
            adapted.route(split, batch)
            selections.append(adapted.experts.selection if adapted.experts is not None else 0)
        chosen = [(g, i) for g, (batch, _) in enumerate(part) for i in batch if i < n]
        conds = torch.stack([split.cond_emb[c].mean(0) for _, c in part]) if adapted.conditioned else None
        answers = generate(adapted, tokenizer, [texts["prompt"][i] for _, i in chosen], cfg, conds,
                           [g for g, _ in chosen], selections)
        for (_, i), answer in zip(chosen, answers):
            outputs[i] = answer
    refs = texts["response"][:n]
    result = {"bleu": bleu(outputs, refs), "rouge_l": rouge_l(outputs, refs), "meteor": meteor(outputs, refs), "n": n}
    if result["meteor"] is None:
        result["meteor_unavailable"] = meteor_jar()[1]
    result["generations"] = [{"instruction": texts["task"][i], "input": texts["input"][i], "reference": refs[i],
                              "output": outputs[i]} for i in range(n)]
    return result
