"""Shared fixtures, and `tiny`, the tests' one config factory. A test file binds the defaults it needs,
    import conftest  # pytest puts tests/ on sys.path
    tiny = functools.partial(conftest.tiny, epochs=2)
and calls tiny(tmp_path, regime=..., ...) as before."""
import functools
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chameleon import Config
from chameleon.backbones import load_backbone
from chameleon.regimes import BATCHINGS


def tiny(tmp_path, **overrides) -> Config:
    """The smoke profile on gpt2-tiny (GPT-2's real tokenizer and Conv1D blocks, 2 layers), reading and writing
    under tmp_path, on a small slice of the data: a run takes seconds. Overrides go through Config.from_profile,
    so a task's overrides (e.g. max_length 48 for instructions) still apply. Run names hash the whole config:
    a file that needs other defaults passes them, rather than this function changing them."""
    return Config.from_profile("smoke", **{"backbone": "gpt2-tiny", "data_dir": tmp_path,
                                           "results_dir": tmp_path / "results", "epochs": 1,
                                           "max_train_examples": 32, "max_eval_examples": 16, **overrides})


# the domains tests' config: short lines (prefix of 4 tokens), every inference batching
tiny_domains = functools.partial(tiny, score_from=4, prefix_tokens=4, max_train_examples=48, max_eval_examples=24,
                                 batchings=tuple(BATCHINGS))

# clearly distinct made-up domains, for the tests that need true domain labels
DOMAIN_LINES = {"prose": "The river number {i} flows quietly past the old stone bridge at dawn",
                "code": "def f{i}(x):\n    return x * {i} + sum(range({i}))",
                "chat": "Hola amigo {i}, ¿cómo estás? Muy bien, gracias por preguntar"}


def labelled_corpus(folder, domains=("prose", "code"), per_domain=100) -> str:
    """A local JSONL corpus of `per_domain` lines of each domain (a `domain` column), written under folder."""
    path = folder / f"{len(domains)}-domains.jsonl"
    rows = [{"text": DOMAIN_LINES[d].format(i=i), "domain": d} for d in domains for i in range(per_domain)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A corpus of two clearly distinct domains (labelled_corpus)."""
    return labelled_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def gpt2_tiny():
    """(model, tokenizer) of load_backbone("gpt2-tiny"), loaded once per test module: 2 layers, width 64."""
    return load_backbone("gpt2-tiny")


@pytest.fixture
def tiny_gpt2():
    """A 2-layer GPT-2 with GPT-2's real vocabulary (50,257) and Conv1D blocks, seeded; width 32, fresh per test."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()


def line_per_cluster(adapter) -> list[str]:
    """The first training line of each training cluster: prompts that a routing adapter sends to different
    clusters (each line to its own: the k-means assignment), whatever gpt2-tiny's random weights make of made-up ones."""
    from chameleon.prepare import prepare

    split, _, _ = prepare(adapter.cfg, adapter.adapted.model, adapter.tokenizer)
    return [split.texts[list(split.labels).index(c)] for c in sorted(set(split.labels))]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(regime, **overrides) -> the folder of a finished run of tiny(...): trained once per session and
    shared by the files that only read a run (test_export, test_hf_generate, test_server)."""
    from chameleon import training
    from chameleon.runs import run_dir

    root = tmp_path_factory.mktemp("shared-runs")

    def train(regime: str, **overrides):
        cfg = tiny(root, regime=regime, **overrides)
        training.train(cfg, progress=False)  # a finished run with this config is read back, not retrained
        return run_dir(cfg)
    return train
