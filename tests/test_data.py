"""Corpora and tokenisation, on the real embedded corpora and on small local files."""
import hashlib
import json
import re
import time

import pytest
import torch
from datasets import Dataset

from chameleon import assets
from chameleon.backbones import gpt2_tokenizer
from chameleon.data import SPLITS, load_instructions, load_lm_corpus, subsample, tokenize


def _digest(ds):
    return hashlib.sha256("\x00".join(ds["text"]).encode()).hexdigest()


# --- the embedded Wikipedia extracts ---

@pytest.fixture(scope="module")
def wiki():
    return load_lm_corpus("wiki")


def test_wiki_has_three_nonempty_text_splits(wiki):
    assert set(wiki) == set(SPLITS)
    for split in SPLITS:
        assert wiki[split].column_names == ["text"]
        assert len(wiki[split]) > 0
        assert all(t.strip() for t in wiki[split]["text"])
    assert len(wiki["train"]) > len(wiki["validation"]) and len(wiki["train"]) > len(wiki["test"])


def test_wiki_splits_are_disjoint(wiki):
    texts = {split: set(wiki[split]["text"]) for split in SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_wiki_is_deterministic(wiki):
    from chameleon import data

    again = data._embedded_corpus.__wrapped__()  # built anew, not the copy cached for the process
    assert {s: _digest(wiki[s]) for s in SPLITS} == {s: _digest(again[s]) for s in SPLITS}


# --- the embedded chatterbot conversations ---

def test_chatterbot_instructions():
    with pytest.warns(UserWarning, match="dropped") as caught:
        ds = load_instructions("chatterbot")
    out = str(caught[0].message)
    assert set(ds) == set(SPLITS)
    for split in SPLITS:
        assert ds[split].column_names == ["instruction", "input", "output"]
        assert len(ds[split]) > 0
        assert all(r["instruction"] and r["output"] for r in ds[split])
    prompts = {s: {(r["instruction"], r["input"]) for r in ds[s]} for s in SPLITS}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    # the corpus holds a few empty turns: they are dropped, and the count is said
    match = re.search(r"dropped (\d+) of (\d+) records", out)
    assert match, out
    dropped, total = map(int, match.groups())
    assert dropped > 0 and total - dropped == sum(len(ds[s]) for s in SPLITS)


# --- local files ---

def _lines(n):
    return [f"Example sentence number {i} talks about topic {i % 7}." for i in range(n)]


def test_local_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_lines(60)) + "\n\n   \n")  # blank lines are skipped
    ds = load_lm_corpus(str(path))
    assert sorted(sum((list(ds[s]["text"]) for s in SPLITS), [])) == sorted(_lines(60))


def test_local_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(_lines(60))))
    ds = load_lm_corpus(str(path))
    assert sum(len(ds[s]) for s in SPLITS) == 60 and ds["train"].column_names == ["text"]


def test_local_parquet(tmp_path):
    path = tmp_path / "corpus.parquet"
    Dataset.from_list([{"text": t} for t in _lines(60)]).to_parquet(str(path))
    ds = load_lm_corpus(str(path))
    assert sorted(sum((list(ds[s]["text"]) for s in SPLITS), [])) == sorted(_lines(60))


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=re.escape(missing)):
        load_lm_corpus(missing)
    with pytest.raises(ValueError, match=re.escape(missing)):
        load_instructions(missing)


@pytest.mark.parametrize("name, text, message", [
    ("blank.txt", "\n   \n\t\n\n", "no usable text"),
    ("bad.jsonl", json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}), r"record 1 lacks \['text'\]"),
    ("two.txt", "First line of text.\nSecond line of text.\n", "split is empty"),  # too small to split
])
def test_unusable_corpus_file_says_why(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_lm_corpus(str(path))


def test_instruction_jsonl_without_output_names_the_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    records = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(5)]
    records[3].pop("output")
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(ValueError, match=r"record 3 lacks \['output'\]"):
        load_instructions(str(path))


def test_hub_corpus_offline_names_the_embedded_default(monkeypatch):
    if assets.hub_reachable():  # online: simulate the offline case this test is about
        monkeypatch.setattr(assets, "hub_reachable", lambda timeout=2.0: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'wiki'"):
        load_lm_corpus("wikitext-2-raw-v1")
    assert time.perf_counter() - start < 5


# --- tokenisation ---

@pytest.fixture(scope="module")
def tok():
    t = gpt2_tokenizer()
    t.padding_side = "right"
    return t


def test_tokenize_right_pads_to_max_length(tok):
    texts = ["Hello world, this is a short line.", "Another, slightly longer line of ordinary text here.", "Hi there"]
    enc = tokenize(texts, tok, max_length=16)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, 16)
    for row, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        n = len(ids)
        assert enc["input_ids"][row, :n].tolist() == ids
        assert enc["attention_mask"][row].tolist() == [1] * n + [0] * (16 - n)
        assert (enc["input_ids"][row, n:] == tok.pad_token_id).all()


def test_tokenize_truncates(tok):
    enc = tokenize(["word " * 100], tok, max_length=8)
    assert enc["input_ids"].shape == (1, 8) and enc["attention_mask"].all()
    assert enc["input_ids"].dtype == torch.long


def test_tokenize_rejects_examples_without_a_target(tok):
    with pytest.raises(ValueError, match="index 1"):
        tokenize(["A normal sentence.", "Hi", "Another normal sentence."], tok, max_length=8)


# --- subsampling ---

def test_subsample_is_deterministic_per_seed():
    ds = Dataset.from_list([{"text": str(i)} for i in range(100)])
    a, b, c = subsample(ds, 10, seed=0), subsample(ds, 10, seed=0), subsample(ds, 10, seed=1)
    assert len(a) == 10 and list(a["text"]) == list(b["text"]) and list(a["text"]) != list(c["text"])
    assert len(set(a["text"])) == 10


def test_subsample_returns_everything_when_n_is_large():
    ds = Dataset.from_list([{"text": str(i)} for i in range(20)])
    assert list(subsample(ds, 20, seed=0)["text"]) == list(ds["text"])
    assert list(subsample(ds, 1000, seed=0)["text"]) == list(ds["text"])
    assert list(subsample(ds, None, seed=0)["text"]) == list(ds["text"])
