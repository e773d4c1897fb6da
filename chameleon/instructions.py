"""Alpaca-style instruction data: the paper's prompt format, what each text is used for, and the
embedded stand-in for Alpaca.

Prompt format (the paper's, plain text; the instruction-tuned SmolLM2's chat template is
deliberately NOT used, so both protocols score the same strings for every backbone):

    ### Instruction:\\n{instruction}\\n### Input:\\n{input}\\n### Response:\\n{output}

with the Input block only when there is an input. The loss is taken on the response alone
(`response_start` gives `objectives.targets` its `loss_from`):

- "causal": every response token and the EOS that `prepare` appends after it (so a tuned
  model learns to stop); prompt positions and right padding are -100.
- "authors": the authors score only the last position of the right-padded sequence, against
  the token AT that position. Restricted to the response, that same single position is all
  that remains: for an example shorter than max_length its target is the pad token (EOS), so
  the head learns "emit EOS"; only an example truncated inside its response is scored on a
  response token, and one truncated inside its prompt is not scored at all. Under "authors"
  greedy generation from a trained head therefore tends to stop at once (BLEU near 0): that
  is what the authors' objective optimises, not a bug of the generation code.

What the hypernetwork and k-means see (`texts`): k-means clusters on the prompt
(instruction + input); conditioning `task` embeds the instruction alone and `task_input` the
prompt, both leak-free since the response is never seen; `batch_mean` embeds prompt +
response (the paper-style contrast, which sees the targets) and `shuffled` is the control.

The embedded stand-in ("embedded" in `data.load_instructions`) joins the chatterbot-corpus
question -> answer pairs (no input field, so `task` == `task_input` there) with instruction
records derived deterministically from the embedded Wikipedia extracts (`wiki_tasks`): a few
fixed instruction templates with varying inputs, so that instruction and input differ and
`task` and `task_input` conditioning can be told apart. It stands in for Alpaca, which is not
available offline.
"""
from __future__ import annotations

import re

import torch

# (instruction, what the input is, what the output is) of each Wikipedia-derived task. All are short,
# so prompt and response fit the CPU profiles' 48-64 tokens (a summarising task would not).
WIKI_TEMPLATES = (
    ("Write a one-line description of the following topic.", "title", "description"),
    ("Name the subject of the following text.", "opening words", "title"),
    ("Which broad field does this text belong to?", "opening words", "topic"),
)
OPENING_WORDS = 16  # the input text: the first sentence, cut to at most this many words
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# a period after these (or after a single letter, "J.") does not end a sentence
_ABBREVIATIONS = {"St", "Mt", "Mr", "Mrs", "Ms", "Dr", "Prof", "Sr", "Jr", "No", "Nos", "Vol", "Fig", "Gen",
                  "Col", "Lt", "Sgt", "Capt", "Rev", "Gov", "Sen", "Rep", "Inc", "Ltd", "Co", "Corp", "Bros",
                  "vs", "ca", "c", "approx", "e.g", "i.e", "U.S", "U.K", "D.C", "Op", "pp", "Jan", "Feb", "Aug",
                  "Sept", "Oct", "Nov", "Dec"}


def prompt(instruction: str, input: str = "") -> str:
    """The paper's prompt: "### Instruction:\\n...\\n### Input:\\n...\\n### Response:\\n" (Input only when given)."""
    block = f"### Input:\n{input}\n" if input else ""
    return f"### Instruction:\n{instruction}\n{block}### Response:\n"


def texts(records: list[dict]) -> dict:
    """The strings a run needs from instruction records.

    Returns a dict of lists: "full" (prompt + response: what the backbone reads), "prompt"
    (instruction + input: what k-means and `task_input` conditioning see), "task" (the
    instruction alone: `task` conditioning), "input" and "response" (the reference output).
    """
    prompts = [prompt(r["instruction"], r["input"]) for r in records]
    return {"full": [p + r["output"] for p, r in zip(prompts, records)], "prompt": prompts,
            "task": [r["instruction"] for r in records], "input": [r["input"] for r in records],
            "response": [r["output"] for r in records]}


def response_start(prompts: list[str], tokenizer) -> torch.Tensor:
    """(N,) index of the first response token: the loss is taken on the response alone.

    The prompt ends in a newline, so BPE never merges across the prompt / response boundary.
    """
    return torch.tensor([len(ids) for ids in tokenizer(prompts)["input_ids"]])


def sentences(text: str) -> list[str]:
    """A plain rule-based sentence split (deterministic; common abbreviations do not end a sentence)."""
    out: list[str] = []
    for piece in (s.strip() for s in _SENTENCE_END.split(text.strip())):
        last = out[-1].rsplit(None, 1)[-1].rstrip(".") if out else ""
        if out and out[-1].endswith(".") and (last in _ABBREVIATIONS or len(last) == 1):
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


def wiki_tasks(articles: dict[str, dict]) -> list[dict]:
    """Instruction records derived from Wikipedia extracts (title, extract, description, topic).

    One record per article and template of WIKI_TEMPLATES when the article has what the
    template needs (a description; an extract; a topic other than "Uncategorized"). Two
    templates share an input and differ in the instruction, so `task` and `task_input`
    conditioning see different things. Each record carries "group" = the article's title, so
    that `data.load_instructions` keeps all records of one article in one split (the title is
    the input of one task and the output of another). A repeated instruction + input keeps its
    first record only.
    """
    rows, seen = [], set()
    for title, a in sorted(articles.items()):
        title = str(a.get("title") or title).strip()
        sents = sentences(str(a.get("extract") or ""))
        opening = " ".join(sents[0].split()[:OPENING_WORDS]) if sents else ""
        topic = str(a.get("topic") or "").strip()
        candidates = [(WIKI_TEMPLATES[0][0], title, str(a.get("description") or "").strip()),
                      (WIKI_TEMPLATES[1][0], opening, title),
                      (WIKI_TEMPLATES[2][0], opening, "" if topic == "Uncategorized" else topic)]
        for instruction, input, output in candidates:
            if input and output and (instruction, input) not in seen:
                seen.add((instruction, input))
                rows.append({"instruction": instruction, "input": input, "output": output, "group": title})
    return rows
