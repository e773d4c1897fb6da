"""The instruction-tuning task: prompt format, response-only targets, leak-free conditioning,
the embedded Alpaca stand-in, bad input, and training + generation end to end on GPT-2 tiny."""
import json
import math
from functools import partial

import pytest
import torch

from chameleon import instructions, prepare as prepare_module
from chameleon.backbones import load_backbone
from chameleon.data import SPLITS, load_instructions
from chameleon.instructions import WIKI_TEMPLATES, prompt, wiki_tasks
from chameleon.objectives import IGNORE
from chameleon.prepare import prepare
from chameleon.runs import finished, plan
from chameleon.training import train

import conftest


def _records(n=80, output=lambda i: f"Answer number {i} is {i * 7 % 13}."):
    tasks = ["Add the numbers.", "Name a colour.", "Translate to French.", "Say hello."]
    return [{"instruction": tasks[i % 4], "input": f"item {i}" if i % 3 else "", "output": output(i)}
            for i in range(n)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# the smoke profile's epochs and sizes; max_length 48, its instruction-task override, comes with the task
tiny = partial(conftest.tiny, task="instructions", epochs=2, max_train_examples=64, max_eval_examples=32)


# --- prompt format ---

def test_prompt_format_has_input_block_only_when_given():
    assert prompt("Sum.", "1 2") == "### Instruction:\nSum.\n### Input:\n1 2\n### Response:\n"
    assert prompt("Hi.") == "### Instruction:\nHi.\n### Response:\n"
    t = instructions.texts([{"instruction": "Sum.", "input": "1 2", "output": "3"}])
    assert t["full"] == [prompt("Sum.", "1 2") + "3"] and t["task"] == ["Sum."] and t["input"] == ["1 2"]


# --- targets: the response (and its EOS) alone ---

def test_causal_targets_are_the_response_tokens_and_eos(tmp_path, gpt2_tiny):
    model, tok = gpt2_tiny
    cfg = tiny(tmp_path, instructions=_jsonl(tmp_path / "i.jsonl", _records()), protocol="causal",
               conditioning="task", max_length=48)
    train_split, _, _ = prepare(cfg, model, tok)
    texts = prepare_module.load_split_texts(cfg, "train")
    for i in range(len(train_split)):
        p = tok(texts["prompt"][i])["input_ids"]
        r = tok(texts["response"][i] + tok.eos_token)["input_ids"]
        target = train_split.targets[i]
        # position t predicts token t + 1: prompt positions but the last are never scored, nor padding
        assert (target[:len(p) - 1] == IGNORE).all()
        scored = target[target != IGNORE].tolist()
        assert scored == (r)[:cfg.max_length - len(p)]
        assert scored[-1] == tok.eos_token_id or len(p) + len(r) > cfg.max_length
        assert (target[len(p) - 1 + len(scored):] == IGNORE).all()


def test_paper_targets_score_only_the_last_position(tmp_path, gpt2_tiny):
    model, tok = gpt2_tiny
    cfg = tiny(tmp_path, instructions=_jsonl(tmp_path / "i.jsonl", _records()), protocol="authors",
               conditioning="task", max_length=48)
    train_split, _, _ = prepare(cfg, model, tok)
    scored = train_split.targets != IGNORE
    assert not scored[:, :-1].any()
    # short examples: the one scored target is the pad token, EOS (see the module docstring)
    assert (train_split.targets[scored] == tok.eos_token_id).all()


# --- conditioning never sees the response ---

def test_task_conditioning_ignores_the_responses(tmp_path, gpt2_tiny):
    model, tok = gpt2_tiny
    a = _jsonl(tmp_path / "a.jsonl", _records())
    b = _jsonl(tmp_path / "b.jsonl", _records(output=lambda i: f"Something else entirely, {i}!"))
    emb = {}
    for conditioning in ("task", "task_input", "batch_mean"):
        for name, path in (("a", a), ("b", b)):
            # the embedding cache is keyed by the file name, so each file gets its own folder
            cfg = tiny(tmp_path / name, instructions=path, conditioning=conditioning)
            split, _, _ = prepare(cfg, model, tok)
            emb[conditioning, name] = (split.cond_emb, split.cluster_emb, split.labels)
    for conditioning in ("task", "task_input"):
        assert torch.equal(emb[conditioning, "a"][0], emb[conditioning, "b"][0])
    assert not torch.equal(emb["batch_mean", "a"][0], emb["batch_mean", "b"][0])  # the paper-style contrast sees it
    assert not torch.equal(emb["task", "a"][0], emb["task_input", "a"][0])
    # k-means sees the prompt alone, so the clusters do not depend on the responses either
    assert torch.equal(emb["task", "a"][1], emb["task", "b"][1])
    assert (emb["task", "a"][2] == emb["task", "b"][2]).all()


# --- the embedded stand-in ---

ARTICLES = {
    "Alpha": {"title": "Alpha", "extract": "Alpha is the first letter of the Greek alphabet, used in many words and "
              "symbols across science. It is old.", "description": "Greek letter", "topic": "Society"},
    "Beta": {"title": "Beta", "extract": "", "description": "", "topic": "Uncategorized"},
}


def test_wiki_tasks_follow_the_templates():
    rows = wiki_tasks(ARTICLES)
    assert rows == wiki_tasks(dict(reversed(ARTICLES.items())))  # deterministic, order-free
    by = {(r["instruction"], r["input"]): r["output"] for r in rows}
    opening = "Alpha is the first letter of the Greek alphabet, used in many words and symbols across"  # 16 words
    assert by == {(WIKI_TEMPLATES[0][0], "Alpha"): "Greek letter", (WIKI_TEMPLATES[1][0], opening): "Alpha",
                  (WIKI_TEMPLATES[2][0], opening): "Society"}  # Beta: no description, no text, no topic
    assert {r["group"] for r in rows} == {"Alpha"}


@pytest.fixture(scope="module")
def embedded():
    return load_instructions("embedded")


def test_embedded_is_leak_free_and_has_inputs(embedded):
    assert set(embedded) == set(SPLITS)
    prompts = {s: {(r["instruction"], r["input"]) for r in embedded[s]} for s in SPLITS}
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for s in SPLITS:
        instr = set(embedded[s]["instruction"])
        assert all(t[0] in instr for t in WIKI_TEMPLATES)  # task != task_input on the Wikipedia part
        assert sum(1 for r in embedded[s] if r["input"]) > len(embedded[s]) / 2
    # an article's title (input of one task, output of another) stays in one split
    val_titles = {r["output"] for r in embedded["validation"] if r["instruction"] == WIKI_TEMPLATES[1][0]}
    train_titles = {r["input"] for r in embedded["train"] if r["instruction"] == WIKI_TEMPLATES[0][0]}
    assert val_titles and not val_titles & train_titles


# --- bad input ---

def test_local_jsonl_bad_records(tmp_path):
    rows = _records() + [{"instruction": "", "input": "", "output": "x"}, {"instruction": "Hi.", "output": " "}]
    with pytest.warns(UserWarning, match="dropped 2 of 82 records with an empty instruction or output"):
        ds = load_instructions(_jsonl(tmp_path / "ok.jsonl", rows))
    assert sum(len(ds[s]) for s in SPLITS) == 80
    bad = _records(5) + [{"instruction": "Hi.", "input": ""}]
    with pytest.raises(ValueError, match=r"record 5 lacks \['output'\]"):
        load_instructions(_jsonl(tmp_path / "bad.jsonl", bad))


# --- end to end: training, then greedy generation and its metrics ---

@pytest.fixture
def fast_data(monkeypatch, embedded):
    """The embedded set loaded once for the module, and METEOR's 10 s java run skipped."""
    monkeypatch.setattr(prepare_module, "load_instructions", lambda name: embedded)
    monkeypatch.setattr("chameleon.serve.metrics.meteor_jar", lambda: (None, "skipped in this test"))


@pytest.mark.parametrize("regime, conditioning", [("unadapted", "task"), ("lora", "task"), ("chameleon", "task"),
                                                  ("chameleon", "task_input"), ("lora_matched", "task"),
                                                  ("svf", "task"), ("svf_experts", "task")])
def test_instruction_regimes_train_and_generate(tmp_path, fast_data, regime, conditioning):
    cfg = tiny(tmp_path, regime=regime, conditioning=conditioning, protocol="causal", max_train_examples=48,
               max_new_tokens=8, n_generate=3, **({"dispatch": "classifier"} if regime == "svf_experts" else {}))
    for step in plan(cfg):  # svf_experts under the classifier: its oracle run first
        result = train(step, progress=False)
    history = result["history"]
    assert all(math.isfinite(h["val_loss"]) for h in history)
    if regime == "svf_experts":  # a classifier run evaluates the experts its oracle run trained
        history = finished(cfg.replace(dispatch="oracle"))["history"]
    if regime != "unadapted":
        assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert 0 <= result["bleu"] <= 100 and 0 <= result["rouge_l"] <= 100
    assert result["meteor"] is None and result["meteor_unavailable"] == "skipped in this test"
    assert result["n"] == 3 and len(result["generations"]) == 3
    val = prepare_module.load_split_texts(cfg, "validation")
    for i, g in enumerate(result["generations"]):
        assert set(g) == {"instruction", "input", "reference", "output"}
        assert (g["instruction"], g["input"], g["reference"]) == (val["task"][i], val["input"][i], val["response"][i])
    saved = json.loads((next((tmp_path / "results").rglob("metrics.json"))).read_text())
    assert saved["generations"] == result["generations"]


@pytest.mark.parametrize("regime", ["chameleon", "svf_experts", "lora_experts"])
def test_batched_generation_equals_one_prompt_at_a_time(tmp_path, fast_data, regime):
    """generation_metrics decodes its examples in batches; each output is what `greedy` gives the prompt alone,
    conditioned (ChameleonLLM) or dispatched (experts) by the example's own validation batch."""
    from chameleon.clustering import eval_batches
    from chameleon.serve.decoding import greedy
    from chameleon.serve.metrics import generation_metrics
    from chameleon.adapters.model import build

    cfg = tiny(tmp_path, regime=regime, conditioning="task", protocol="causal", max_train_examples=48,
               max_new_tokens=4, n_generate=16, dispatch="oracle")
    model, tok = load_backbone(cfg.backbone, seed=0)
    train_split, val_split, _ = prepare(cfg, model, tok)
    adapted = build(cfg, model).eval()
    adapted.bind(train_split, val_split)
    if adapted.experts is not None:  # distinct experts, so that a wrong dispatch would change the outputs
        with torch.no_grad():
            for k, expert in enumerate(adapted.experts.experts):
                g = torch.Generator().manual_seed(k)
                for p in expert.parameters():
                    if p.requires_grad:
                        p.copy_(3 * torch.randn(p.shape, generator=g))
    result = generation_metrics(adapted, val_split, cfg, tok)
    prompts = prepare_module.load_split_texts(cfg, "validation")["prompt"]
    selections = set()
    for batch, cond_batch in eval_batches(val_split.labels, cfg.batch_size, cfg.conditioning):
        adapted.route(val_split, batch)
        selections.add(adapted.experts.selection if adapted.experts else None)
        cond = val_split.cond_emb[cond_batch].mean(0) if adapted.conditioned else None
        for i in (i for i in batch if i < 16):
            ids = torch.tensor(tok(prompts[i])["input_ids"][-cfg.max_length:])
            alone = tok.decode(greedy(adapted, ids, 4, tok.eos_token_id, cond), skip_special_tokens=True).strip()
            assert result["generations"][i]["output"] == alone, i
    assert regime == "chameleon" or len(selections) > 1  # the batches do go to different experts
