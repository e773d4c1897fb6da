"""Greedy generation from an adapted model (sampling too, for REINFORCE), and the paper's generation metrics.

    result = generation_metrics(adapted, val_split, cfg, tokenizer)
    result["bleu"], result["rouge_l"], result["meteor"], result["generations"]

Decoding is greedy, up to cfg.max_new_tokens new tokens, stopping at EOS, one prompt at a
time with the body's KV cache (linear in the output length). Every token goes through
`adapted.hidden`'s body and `adapted.logits`, so LoRA, block LoRA and ChameleonLLM heads all
decode the way they were trained. A ChameleonLLM head is conditioned as in evaluation: on
the mean conditioning embedding of the example's validation batch (its cluster batch, or
another batch under `shuffled`). With `batch_mean` conditioning that mean includes the
responses of the batch: the paper-style contrast, which sees the targets; `task` and
`task_input` never see a response.

The prompt is the paper's format without the response; a prompt longer than cfg.max_length
tokens keeps its last cfg.max_length tokens (those that end in "### Response:\\n"). Every
prompt token is attended under both protocols (the paper's `input_ids != 0` mask would only
hide token id 0).

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


@torch.no_grad()
def decode(adapted, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           cond: torch.Tensor | None = None, temperature: float = 0.0,
           generator: torch.Generator | None = None) -> list[int]:
    """Continuation of one prompt: the new token ids, EOS excluded. Fewer than max_new_tokens ids
    means that EOS was chosen.

    Args:
        adapted: a `regimes.Adapted` (any regime).
        prompt_ids: (T,) token ids of the prompt.
        max_new_tokens: at most this many new tokens.
        eos_id: stop when this token is chosen (None: never stop early).
        cond: (d,) conditioning vector of a ChameleonLLM head; ignored otherwise.
        temperature: 0 decodes greedily; above 0 each token is sampled from softmax(logits / temperature).
        generator: a CPU torch.Generator for the sampling.
    """
    dev = next(adapted.parameters()).device
    ids, past, new = prompt_ids.view(1, -1).to(dev), None, []
    for _ in range(max_new_tokens):
        out = adapted.body(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        hidden = out.last_hidden_state[:, -1]  # (1, d)
        logits = adapted.logits(hidden, None if cond is None else cond.to(dev, hidden.dtype))
        if temperature > 0:  # drawn on the CPU, so that one seed gives the same answers on every device
            probs = (logits.float() / temperature).softmax(-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).view(1).to(dev)
        else:
            token = logits.argmax(-1)
        if eos_id is not None and token.item() == eos_id:
            break
        new.append(token.item())
        ids = token.view(1, 1)
    return new


def greedy(adapted, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           cond: torch.Tensor | None = None) -> list[int]:
    """Greedy continuation of one prompt: `decode` at temperature 0."""
    return decode(adapted, prompt_ids, max_new_tokens, eos_id, cond)


def generation_conditions(split, cfg: Config, n: int) -> list[torch.Tensor | None]:
    """The conditioning vector of each of the first n examples of `split`, as `evaluate` uses it."""
    conds: list[torch.Tensor | None] = [None] * n
    for batch, cond_batch in eval_batches(split.labels, cfg.batch_size, cfg.conditioning):
        mean = split.cond_emb[cond_batch].mean(0)
        for i in batch:
            if i < n:
                conds[i] = mean
    return conds


def generate(adapted, tokenizer, prompts: list[str], cfg: Config,
             conds: list[torch.Tensor | None] | None = None, route=None) -> list[str]:
    """Greedy outputs (decoded, special tokens skipped) for each prompt; route(i), when given, is
    called before prompt i (the SVF experts' first pass picks the expert of its batch)."""
    adapted.eval()
    outputs = []
    for i, text in enumerate(prompts):
        if route is not None:
            route(i)
        ids = torch.tensor(tokenizer(text)["input_ids"][-cfg.max_length:])
        cond = conds[i] if conds is not None and adapted.conditioned else None
        new = greedy(adapted, ids, cfg.max_new_tokens, tokenizer.eos_token_id, cond)
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs


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
    conds = generation_conditions(split, cfg, n) if adapted.conditioned else None
    batch_of = {i: batch for batch, _ in eval_batches(split.labels, cfg.batch_size, cfg.conditioning) for i in batch}
    outputs = generate(adapted, tokenizer, texts["prompt"][:n], cfg, conds,
                       route=lambda i: adapted.route(split, batch_of[i]))  # dispatched as in evaluation
    refs = texts["response"][:n]
    result = {"bleu": bleu(outputs, refs), "rouge_l": rouge_l(outputs, refs), "meteor": meteor(outputs, refs), "n": n}
    if result["meteor"] is None:
        result["meteor_unavailable"] = meteor_jar()[1]
    result["generations"] = [{"instruction": texts["task"][i], "input": texts["input"][i], "reference": refs[i],
                              "output": outputs[i]} for i in range(n)]
    return result
