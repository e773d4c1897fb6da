"""Alpaca-style instruction data: the paper's prompt format and what each text is used for.

The instruction-tuned SmolLM2's chat template is deliberately NOT used: the paper's prompt
format is plain text, and both protocols score the same strings for every backbone.
"""
from __future__ import annotations

import torch


def prompt(instruction: str, input: str = "") -> str:
    """The paper's prompt: "### Instruction:\\n...\\n### Input:\\n...\\n### Response:\\n" (Input only when given)."""
    block = f"### Input:\n{input}\n" if input else ""
    return f"### Instruction:\n{instruction}\n{block}### Response:\n"


def texts(records: list[dict]) -> dict:
    """The strings a run needs from instruction records.

    Returns a dict of lists: "full" (prompt + response: what the backbone reads), "prompt"
    (instruction + input: what k-means and `task_input` conditioning see), "task" (the
    instruction alone: `task` conditioning) and "response" (the reference output).
    """
    prompts = [prompt(r["instruction"], r["input"]) for r in records]
    return {"full": [p + r["output"] for p, r in zip(prompts, records)], "prompt": prompts,
            "task": [r["instruction"] for r in records], "response": [r["output"] for r in records]}


def response_start(prompts: list[str], tokenizer) -> torch.Tensor:
    """(N,) index of the first response token: the loss is taken on the response alone.

    The prompt ends in a newline, so BPE never merges across the prompt / response boundary.
    """
    return torch.tensor([len(ids) for ids in tokenizer(prompts)["input_ids"]])
