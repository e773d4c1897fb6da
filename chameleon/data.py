"""Corpora with one schema each, and tokenisation into fixed-length tensors.

Language modelling: DatasetDict(train / validation / test) with a "text" column, and a "domain" column
where the corpus has one (the embedded `domains` corpus, or a local JSONL with a "domain" field).
Instructions: DatasetDict(train / validation / test) with "instruction", "input", "output".
Splits we make ourselves are decided by a hash of the example's text, so every machine
gets the same split and no text sits in two splits.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import torch
import yaml
from datasets import Dataset, DatasetDict

from chameleon.assets import ASSETS
from chameleon.instructions import wiki_tasks

SPLITS = ("train", "validation", "test")
FORMAT = 2  # bump when the way examples are built from a source changes: it keys finished runs
INSTRUCTION_FIELDS = ("instruction", "input", "output")
DEV_SHARE = 0.15  # of the train split, carved out as a dev split for choosing learning rates (Config.dev_split)
# The `domains` corpus: encyclopedic English, Python source, and dialogue in four languages (chatterbot-corpus,
# the larger Latin-script languages; the turns of a conversation joined into one example).
DIALOGUES = {"dialogue_en": "english", "dialogue_it": "italian", "dialogue_pt": "portuguese", "dialogue_es": "spanish"}
CODE_PACKAGE = "sklearn"  # scikit-learn, pinned in requirements.txt: its .py files read the same on every machine
PER_DOMAIN = 250  # examples kept per domain (a hash order): balanced, about 1,000 of them in the train split
MIN_WORDS = 8  # shorter examples ("Hi Hello") leave too few tokens after the prefix to score
HUB_HINT = "the Hugging Face hub is unreachable from here; offline, use the embedded default {default!r}"


def load_lm_corpus(name: str = "wiki") -> DatasetDict:
    """A language-modelling corpus: "wiki" (embedded), "domains" (embedded, six labelled domains),
    "wikitext-2-raw-v1" (hub) or a local file.

    Args:
        name: a corpus name, or a path to a .txt (one example per non-empty line), .jsonl
            (a "text" field per line, and optionally a "domain" field on every line) or .parquet (a
            "text" column, optionally "domain") file.
    """
    if name == "wiki":
        return _embedded_corpus()
    if name == "domains":
        return _domains_corpus()
    if name in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        ds = _from_hub(name, "wiki", "wikitext", name)
        # WikiText keeps blank lines as separators; they hold no example.
        return ds.filter(lambda r: bool(r["text"].strip()))
    rows = _read_local(name, "a corpus name ('wiki', 'wikitext-2-raw-v1')")
    if rows is None:  # plain text: one example per non-empty line
        rows = [{"text": line.strip()} for line in _read_text(Path(name)).splitlines()]
    labelled = all(isinstance(r, dict) and "domain" in r for r in rows)
    rows = [{"text": str(r["text"]).strip(), **({"domain": str(r["domain"])} if labelled else {})}
            for r in _require_fields(rows, ("text",), name) if str(r["text"]).strip()]
    if not rows:
        raise ValueError(f"{name} holds no usable text: every example is empty; give it non-empty lines")
    return _hash_split(rows, key=lambda r: r["text"], name=name)


@functools.cache  # installed package data, read and split once per process
def _embedded_corpus() -> DatasetDict:
    # Laid out as WikiText is: a " = Title = " heading line, then the article's paragraph, one
    # example per line. The short heading lines are what the authors' protocol pads, as in WikiText-2.
    rows = [{"text": line, "article": title} for title, a in sorted(_wiki_articles().items())
            if a["extract"].strip() for line in (f" = {title} = ", a["extract"].strip())]
    return _hash_split(rows, key=lambda r: r["article"], name="wiki").remove_columns("article")


@functools.cache
def _domains_corpus() -> DatasetDict:
    """Six domains, PER_DOMAIN examples each, every line labelled; split 70 / 20 / 10 by article, source
    file or conversation, so that no article or file is in two splits."""
    rows = [dict(text=a["extract"].strip(), domain="encyclopedia", key=title)
            for title, a in sorted(_wiki_articles().items())]
    rows += _code_blocks()
    rows += [dict(text=text, domain=domain, key=text) for domain, language in DIALOGUES.items()
             for text in _conversations(language)]
    rows = [r for r in rows if len(r["text"].split()) >= MIN_WORDS]
    rows = list({r["text"]: r for r in reversed(rows)}.values())  # one copy of a text (its first): no text in two splits
    kept = []
    for domain in ("encyclopedia", "code", *DIALOGUES):
        mine = sorted((r for r in rows if r["domain"] == domain), key=lambda r: _hash("keep:" + r["text"]))
        kept += mine[:PER_DOMAIN]
    # the key stays as column "group": a dev split carved by it (Config.dev_key) keeps a file's blocks together
    return _hash_split(kept, key=lambda r: r["key"], name="domains", fractions=(0.7, 0.2)).rename_column("key", "group")


def _code_blocks() -> list[dict]:
    """CODE_PACKAGE's source as runs of consecutive non-blank lines (at most 12), keyed by their file."""
    import importlib

    root = Path(importlib.import_module(CODE_PACKAGE).__file__).parent
    rows = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        block: list[str] = []
        for line in lines + [""]:
            if line.strip() and len(block) < 12:
                block.append(line.rstrip())
                continue
            if len(block) >= 2:
                rows.append(dict(text="\n".join(block), domain="code", key=str(path.relative_to(root))))
            block = [line.rstrip()] if line.strip() else []
    return rows


def _conversations(language: str) -> list[str]:
    """chatterbot-corpus conversations in `language`, each one example (its turns joined), de-duplicated."""
    folder = ASSETS["chatterbot"].require().parent.parent / language
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    texts = [" ".join(str(turn).strip() for turn in conv)
             for path in sorted(folder.glob("*.yml"))
             for conv in (yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}).get("conversations") or []]
    return list(dict.fromkeys(texts))


def _hash(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 16**8


def carve_dev(ds: Dataset, split: str, key: str = "text") -> Dataset:
    """The train split without its dev part ("train"), or the dev part ("validation"): DEV_SHARE of the
    train split by a hash of column `key` (Config.dev_key), the same on every machine. Carved by "group" (the
    article, file or conversation the corpus was split by), no source has examples on both sides."""
    if key not in ds.column_names:
        raise ValueError(f"dev_key={key!r}: this corpus has no {key!r} column (it has {ds.column_names}); use "
                         f"dev_key='text', or a corpus that records each example's group (--corpus domains)")
    dev = [_hash("dev:" + t) < DEV_SHARE for t in ds[key]]
    return ds.select([i for i, d in enumerate(dev) if d == (split == "validation")])


def _wiki_articles() -> dict:
    return json.loads(ASSETS["wiki"].require().read_text())


def load_instructions(name: str = "embedded") -> DatasetDict:
    """Instruction data: "embedded" (the stand-in for Alpaca: chatterbot pairs + instructions derived
    from the Wikipedia extracts, see `chameleon.instructions`), "chatterbot" (its question -> answer
    pairs alone), "alpaca" (yahma/alpaca-cleaned) or a local JSON / JSONL file in Alpaca's format
    (instruction, input, output per record)."""
    if name in ("embedded", "chatterbot"):
        ds, dropped, total = _embedded(name)
    else:
        if name == "alpaca":
            rows = list(_from_hub(name, "embedded", "yahma/alpaca-cleaned")["train"])
        else:
            rows = _read_local(name, "an instruction set name ('embedded', 'chatterbot', 'alpaca')")
            if rows is None:
                raise ValueError(f"{name}: instruction data must be .json or .jsonl in Alpaca's format")
        ds, dropped, total = _clean_and_split(rows, name)
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} of {total} records with an empty instruction or output")
    return ds


def _clean_and_split(rows: list[dict], name: str) -> tuple[DatasetDict, int, int]:
    """The records with an instruction and an output, split; and how many were dropped of how many."""
    rows = _require_fields(rows, ("instruction", "output"), name)
    kept = [{**{f: str(r.get(f) or "").strip() for f in INSTRUCTION_FIELDS}, "group": r.get("group")} for r in rows]
    kept = [r for r in kept if r["instruction"] and r["output"]]
    # Identical prompts must not straddle splits: the split follows a hash of instruction + input, or of
    # the article's title for the records derived from one Wikipedia article.
    ds = _hash_split(kept, key=lambda r: r["group"] or r["instruction"] + "\n" + r["input"], name=name)
    return ds.remove_columns("group"), len(rows) - len(kept), len(rows)


@functools.cache  # installed package data, read and split once per process: a notebook trains many runs on it
def _embedded(name: str) -> tuple[DatasetDict, int, int]:
    rows = _chatterbot_pairs()
    if name == "embedded":
        rows += wiki_tasks(_wiki_articles())
    return _clean_and_split(rows, name)


def _chatterbot_pairs() -> list[dict]:
    """Real prompt -> response pairs: each statement of a chatterbot conversation and the next one."""
    rows = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: 10x faster
    for path in sorted(ASSETS["chatterbot"].require().parent.glob("*.yml")):
        for conv in yaml.load(path.read_text(), Loader=loader).get("conversations", []):
            conv = [str(turn) for turn in conv]
            rows += [{"instruction": q, "input": "", "output": a} for q, a in zip(conv, conv[1:])]
    return rows


def _hash_split(rows: list[dict], key, name: str, fractions=(0.8, 0.1)) -> DatasetDict:
    """Deterministic 80 / 10 / 10 split by a hash of key(row): the same on every machine, and
    identical keys always land in the same split. Order within a split follows the input."""
    parts = {s: [] for s in SPLITS}
    for row in rows:
        u = _hash(key(row))
        parts["train" if u < fractions[0] else "validation" if u < sum(fractions) else "test"].append(row)
    for split, part in parts.items():
        if not part:
            distinct = len({key(r) for r in rows})
            if distinct < len(rows):  # duplicates share a key, so they land in one split together
                raise ValueError(f"{name}: the {split} split is empty: its {len(rows)} examples hold only {distinct} "
                                 f"distinct texts, and identical texts always land in the same split; give it "
                                 f"more distinct examples (at least a few dozen)")
            raise ValueError(f"{name}: the {split} split is empty ({len(rows)} examples in all); "
                             f"give it more examples (at least a few dozen)")
    return DatasetDict({s: Dataset.from_list(p) for s, p in parts.items()})


def _from_hub(name: str, default: str, *args) -> DatasetDict:
    from datasets import load_dataset
    from chameleon.assets import hub_reachable

    if not hub_reachable():
        raise ValueError(f"{name!r} comes from the Hugging Face hub, but " + HUB_HINT.format(default=default))
    return load_dataset(*args)


def _read_local(name: str, what: str) -> list[dict] | None:
    """Records of a local .json / .jsonl / .parquet file; None for a plain-text file."""
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"{name!r} is neither {what} nor an existing file; check the path")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: line {err.doc!r:.60} is not valid JSON; write one JSON object per line")
    if path.suffix == ".json":
        data = json.loads(_read_text(path))
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path)).to_list()
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: byte {err.start} is not UTF-8 text ({err.reason}); the corpus must be a UTF-8 "
                         "text file: convert it (e.g. `iconv -f latin1 -t utf-8`) or point at another file") from None


def _require_fields(rows: list, fields: tuple[str, ...], name: str) -> list[dict]:
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{name}: record {i} lacks {missing} (it has {have}); every record needs {list(fields)}")
    return rows


def fingerprint(name: str) -> str:
    """What identifies a corpus's content without reading it: the source file's size and
    modification time (embedded asset or local file) or the hub name, and FORMAT."""
    if name == "domains":  # the wiki and chatterbot assets and the code package's version
        from importlib.metadata import version

        return ":".join([fingerprint("wiki"), fingerprint("chatterbot"), version("scikit-learn"), str(PER_DOMAIN)])
    asset = {"wiki": "wiki", "embedded": "wiki", "chatterbot": "chatterbot"}.get(name)
    path = ASSETS[asset].path() if asset else Path(name) if Path(name).is_file() else None
    stat = f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path else "hub"
    return f"{name}:{stat}:v{FORMAT}"


def subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """The first n examples of a seeded permutation (all of them when n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def tokenize(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated (N, max_length) input_ids and attention_mask, as the paper batches them.

    Raises ValueError when an example has fewer than 2 real tokens: nothing to predict.
    """
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    short = (enc["attention_mask"].sum(1) < 2).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"{len(short)} example(s) have fewer than 2 real tokens (e.g. index {short[0]}: "
                         f"{texts[short[0]]!r}); drop them from the data, nothing can be predicted there")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
