"""Greedy generation from an adapted model (sampling too, for REINFORCE), and the paper's generation metrics.

    result = generation_metrics(adapted, val_split, cfg, tokenizer)
    result["bleu"], result["rouge_l"], result["meteor"], result["generations"]

Decoding is greedy, up to cfg.max_new_tokens new tokens, stopping at EOS, with the body's KV
cache (linear in the output length): `greedy` one prompt at a time, `batched_greedy` many at once
(left-padded, one body forward a step for the batch, token for token what `greedy` gives; a
step reads every weight once, so on a CPU n prompts cost little more than one). Every token goes
through `adapted.body` and the head, so LoRA, block LoRA, SVF experts and ChameleonLLM heads all
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


def generate(adapted, tokenizer, prompts: list[str], cfg: Config, conds: torch.Tensor | None = None,
             groups: list[int] | None = None, selections: list[int] | None = None) -> list[str]:
    """Greedy outputs (decoded, special tokens skipped) of `prompts`, decoded as one batch
    (`batched_greedy`); prompt i's head is its group's: conds[groups[i]] conditions a ChameleonLLM head,
    selections[groups[i]] picks a LoRA expert."""
    adapted.eval()
    tokens = batched_greedy(adapted, tokenize_prompts(tokenizer, prompts, cfg.max_length), cfg.max_new_tokens,
                            tokenizer.eos_token_id, tokenizer.pad_token_id, conds, groups, selections)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt, its last max_length tokens (those that end a long prompt)."""
    ids = [tokenizer(p)["input_ids"][-max_length:] for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) has no tokens; give it some text")
    return ids


class GroupedHead:
    """The head's logits for a batch whose rows belong to groups: one low-rank update per group.

    For a ChameleonLLM head the hypernetwork runs once, on the (G, d) group vectors; LoRA experts give
    each group's selected expert (`Adapted.group_adapters`): A (G, r, d_in) and B (G, d_out, r). Each
    call then adds scaling * (h @ A[g].T) @ B[g].T to the base logits of group g's rows: in place on a
    contiguous segment (`batched_greedy` sorts its rows by group), gathered and put back otherwise (rows in
    a caller's order, `hf.HFAdapted`); the same addmm either way. Other heads are the same for every group
    and are called as they are.
    """

    def __init__(self, adapted, conds: torch.Tensor | None, selections: list[int] | None, n_groups: int):
        self.adapted = adapted
        if any(x is not None and len(x) != n_groups for x in (conds, selections)):
            raise ValueError(f"{n_groups} groups need one conditioning vector and one selection each")
        self.adapters = adapted.group_adapters(conds, selections)
        self._parts: tuple[torch.Tensor, list] | None = None  # (groups, their rows): the same tensor every step

    def __call__(self, hidden: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(n, d_in) hidden states and the (n,) group of each row -> (n, vocab) logits."""
        if self.adapters is None:
            return self.adapted.logits(hidden)
        A, B, scaling = self.adapters
        out = self.adapted.head.base(hidden)
        for g, rows in self.partition(groups):  # as LoRA.forward with group g's A and B, on its rows
            low = hidden[rows] @ A[g].T * scaling
            if isinstance(rows, slice):
                out[rows].addmm_(low, B[g].T)
            else:
                out[rows] = torch.addmm(out[rows], low, B[g].T)
        return out

    def partition(self, groups: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
        """(group, its rows) for each group present: a slice where the rows are contiguous (updated in place),
        else their indices. Computed once per groups tensor."""
        if self._parts is None or self._parts[0] is not groups:
            parts = []
            for g in groups.unique().tolist():
                rows = (groups == g).nonzero().view(-1)
                start, end = rows[0].item(), rows[-1].item() + 1
                parts.append((g, slice(start, end) if end - start == len(rows) else rows))
            self._parts = (groups, parts)
        return self._parts[1]


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (n, longest): every row's last prompt token in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def batched_greedy(adapted, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                   pad_id: int, conds: torch.Tensor | None = None, groups: list[int] | None = None,
                   selections: list[int] | None = None) -> list[list[int]]:
    """Greedy continuations of many prompts at once: the new token ids of each, EOS excluded.

    Token for token what `generation.greedy` gives one prompt at a time with cond=conds[groups[i]].

    Args:
        adapted: a `regimes.Adapted` (any regime), in eval mode.
        prompts: token ids of each prompt (at least one token each).
        max_new_tokens: at most this many new tokens per prompt.
        eos_id: a row stops when it chooses this token (None: never early).
        pad_id: token fed to padding positions and to finished rows (never attended).
        conds: (G, d) conditioning vector of each group; needed by a ChameleonLLM head only.
        groups: group (0..G-1) of each prompt; None puts every prompt in group 0.
        selections: the expert of each group, for LoRA experts (None: the one routed last, for every group).
    """
    n = len(prompts)
    if n == 0 or max_new_tokens < 1:
        return [[] for _ in range(n)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    groups = [0] * n if groups is None else list(groups)
    dev = next(adapted.parameters()).device
    order = sorted(range(n), key=lambda i: groups[i])  # stable: each group becomes one contiguous segment
    head = GroupedHead(adapted, conds, selections, max(groups) + 1)
    rows_groups = torch.tensor([groups[i] for i in order], device=dev)
    ids, mask = left_padded([prompts[i] for i in order], pad_id, dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens count 0, 1, 2, ... as without padding
    past = None
    new = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    ones = torch.ones((n, 1), dtype=torch.long, device=dev)
    steps = 0
    for t in range(max_new_tokens):
        out = adapted.body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = head(out.last_hidden_state[:, -1], rows_groups).argmax(-1)
        token = token.masked_fill(done, pad_id)
        new[:, t] = token
        steps = t + 1
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):  # one host sync per step, as Hugging Face's generate
                break
        ids, positions, mask = token[:, None], positions[:, -1:] + 1, torch.cat([mask, ones], 1)
    rows = new[:, :steps].tolist()
    result: list[list[int]] = [[] for _ in range(n)]
    for row, i in enumerate(order):
        result[i] = until_eos(rows[row], eos_id)
    return result


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS (all of them when eos_id is None)."""
    return tokens[:tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


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
