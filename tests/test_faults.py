"""The bad-input and fault sweep (issue 8): every case ends in one clear message or a correct result."""
import re
import subprocess
import sys
import warnings
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chameleon import __main__ as cli
from chameleon import backbones, training
from chameleon.backbones import load_backbone
from chameleon.cache import cache_path, cached
from chameleon.data import load_lm_corpus
from chameleon.prepare import prepare
from chameleon.adapters.model import build
from chameleon.runs import CHECKPOINT, load_checkpoint, run_dir, save_checkpoint
from chameleon.training import TrainingDiverged, scored_rows, train

import conftest

tiny = partial(conftest.tiny, regime="lora")  # one epoch of LoRA on 32 examples: each run takes a few seconds


def _lines(n):
    return [f"Example sentence number {i} talks about topic {i % 7}." for i in range(n)]


# --- 1. caches are checked, never trusted blindly ---

def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value.clone()
    return compute, calls


def test_cache_file_of_another_key_is_rebuilt(tmp_path):
    compute, calls = _counting(torch.ones(4, 3))
    cached({"n": 4, "kind": "b"}, tmp_path, lambda: torch.zeros(4, 3))
    cached({"n": 4, "kind": "a"}, tmp_path, compute)
    # another key's file (other values) copied over this key's file
    cache_path({"n": 4, "kind": "a"}, tmp_path).write_bytes(cache_path({"n": 4, "kind": "b"}, tmp_path).read_bytes())
    with pytest.warns(UserWarning, match=r"\.safetensors was written for another key; rebuilding it"):
        again = cached({"n": 4, "kind": "a"}, tmp_path, compute)
    assert len(calls) == 2 and torch.equal(again, torch.ones(4, 3))


def test_cache_file_of_the_wrong_shape_is_rebuilt(tmp_path):
    key = {"n": 64}
    cached(key, tmp_path, lambda: torch.zeros(16, 3))  # e.g. written by a run on 16 of the 64 examples
    compute, calls = _counting(torch.ones(64, 3))
    with pytest.warns(UserWarning, match=r"holds shape \(16, 3\), expected \(64, 3\); rebuilding it"):
        assert cached(key, tmp_path, compute, expect_shape=(64, 3)).shape == (64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt for good: read back silently
        assert cached(key, tmp_path, compute, expect_shape=(64, None)).shape == (64, 3)
    assert len(calls) == 1


def test_cache_file_of_random_bytes_is_rebuilt(tmp_path):
    key = {"n": 4}
    path = cache_path(key, tmp_path)
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + " is unreadable"):
        assert torch.equal(cached(key, tmp_path, lambda: torch.ones(4, 3)), torch.ones(4, 3))


def test_prepare_rebuilds_a_short_embeddings_file(tmp_path, gpt2_tiny):
    cfg = tiny(tmp_path)
    model, tok = gpt2_tiny
    train_split, _, _ = prepare(cfg, model, tok)
    files = sorted((tmp_path / "cache" / "embeddings").glob("*.safetensors"))
    for path in files:  # every file now holds the first 16 rows, under its own key
        with safe_open(path, "pt") as f:
            name, meta = f.keys()[0], f.metadata()
            save_file({name: f.get_tensor(name)[:16].contiguous()}, path, metadata=meta)
    with pytest.warns(UserWarning, match="expected"):
        again, _, _ = prepare(cfg, model, tok)
    torch.testing.assert_close(again.cluster_emb, train_split.cluster_emb)


def test_hidden_state_cache_is_rebuilt_when_truncated(tmp_path, gpt2_tiny):
    cfg = tiny(tmp_path)
    model, tok = gpt2_tiny
    split, _, _ = prepare(cfg, model, tok)
    adapted = build(cfg, model)
    hidden = scored_rows(adapted, split, True, cfg.cache_dir).hidden
    first = hidden[torch.arange(len(hidden))]
    (path,) = (cfg.cache_dir / "hidden").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="is unreadable"):
        again = scored_rows(adapted, split, True, cfg.cache_dir).hidden
    torch.testing.assert_close(again[torch.arange(len(again))], first)


def test_truncated_smollm2_copy_is_converted_again(tmp_path, monkeypatch):
    gguf = backbones.ASSETS["smollm2"].require()
    copy = tmp_path / "models" / f"smollm2-{backbones._sha256(gguf)[:16]}"
    copy.mkdir(parents=True)
    (copy / "model.safetensors").write_bytes(b"\x00" * 100)

    def convert(_, target):  # a stand-in for the 20-30 s conversion: a tiny model where the copy goes
        model, tok = load_backbone("gpt2-tiny")
        model.save_pretrained(target)
        tok.save_pretrained(target)

    monkeypatch.setattr(backbones, "_convert_gguf", convert)
    with pytest.warns(UserWarning, match="SmolLM2 copy .* is unreadable"):
        model, _ = load_backbone("smollm2", cache_dir=tmp_path)
    assert model.config.n_layer == 2


# --- 2. divergence ---

def test_exploding_val_loss_is_not_filed_as_a_result(tmp_path):
    cfg = tiny(tmp_path, lr=100.0)
    with pytest.raises(TrainingDiverged, match=r"val loss .* exceeds .* the val loss before training .* "
                                               r"lower lr \(now 100.0\); no checkpoint was written"):
        train(cfg, progress=False)
    assert not (run_dir(cfg) / "metrics.json").exists()


def test_cli_reports_divergence_in_one_line(tmp_path, monkeypatch, capsys):
    config = cli._config
    monkeypatch.setattr(cli, "_config", lambda args: config(args).replace(data_dir=tmp_path,
                                                                          results_dir=tmp_path / "results"))
    argv = ["train", "--profile", "smoke", "--backbone", "gpt2-tiny", "--regime", "lora", "--epochs", "1",
            "--max-train-examples", "32", "--max-eval-examples", "16", "--lr", "1e9"]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is progress bars
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"error: loss is nan at epoch 1, step \d+ .*lower lr \(now 1000000000.0\); "
                        r"no checkpoint was written", lines[0]), err


# --- 3. short lines ---

def test_short_lines_are_dropped_with_a_notice(tmp_path, gpt2_tiny):
    path = tmp_path / "corpus.txt"
    words = "Hello World Yes No Maybe The And But So Then When Where Why How What Who This That These Those".split()
    path.write_text("\n".join(_lines(80) + words))  # one GPT-2 token each: nothing to predict
    cfg = tiny(tmp_path, corpus=str(path), max_train_examples=None, max_eval_examples=None)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + r" \(train split\): dropped \d+ of \d+ examples "
                                         r"with fewer than 2 tokens \(e.g. '\w+'\)"):
        train_split, val_split, _ = prepare(cfg, *gpt2_tiny)
    for split in (train_split, val_split):
        assert not set(words) & set(split.texts)
        assert len(split.texts) == len(split.input_ids) == len(split.cond_emb) == len(split.labels) > 0


def test_cli_max_length_1_blames_the_option(capsys):
    assert cli.main(["train", "--profile", "smoke", "--max-length", "1"]) == 2
    assert "max_length must be at least 2 tokens" in capsys.readouterr().err


# --- 4. checkpoints ---

def _checkpoint(cfg, model, epoch=1):
    adapted = build(cfg, model)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad])
    run_dir(cfg).mkdir(parents=True)
    save_checkpoint(run_dir(cfg), adapted, opt, [{"epoch": 0, "val_loss": 1.0}], epoch, 3, 0.5)
    return adapted, opt


def test_checkpoint_is_one_file_with_its_metadata(tmp_path):
    cfg = tiny(tmp_path)
    adapted, opt = _checkpoint(cfg, load_backbone("gpt2-tiny")[0], epoch=2)
    assert sorted(p.name for p in run_dir(cfg).iterdir()) == [CHECKPOINT]  # no checkpoint.json to pair it with
    history, epoch, step, seconds = load_checkpoint(run_dir(cfg), adapted, opt)
    assert (history, epoch, step, seconds) == ([{"epoch": 0, "val_loss": 1.0}], 2, 3, 0.5)


def test_truncated_checkpoint_on_resume_says_what_to_do(tmp_path):
    cfg = tiny(tmp_path)
    _checkpoint(cfg, load_backbone("gpt2-tiny")[0])
    path = run_dir(cfg) / CHECKPOINT
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" is unreadable .*; delete .* to start over, "
                                         r"or run without --resume"):
        train(cfg, resume=True, progress=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model = load_backbone("gpt2-tiny")[0]
    cfg = tiny(tmp_path)
    _checkpoint(cfg, model)
    other = build(cfg.replace(rank=8), load_backbone("gpt2-tiny")[0])
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"does not fit this model \(2 tensors differ, e.g. .*\(4, 64\) in the file, "
                                         r"\(8, 64\) in the model\)"):
        load_checkpoint(run_dir(cfg), other, opt)


# --- 5. smaller cases ---

def test_non_utf8_corpus_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("\n".join(_lines(60) + ["Caf\xe9 au lait."]).encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": byte \d+ is not UTF-8 text .*convert it"):
        load_lm_corpus(str(path))


def test_identical_lines_are_named_as_duplicates(tmp_path):
    path = tmp_path / "repeated.txt"
    path.write_text("\n".join(_lines(3) * 40))
    with pytest.raises(ValueError, match=r"its 120 examples hold only 3 distinct texts, and identical texts "
                                         r"always land in the same split"):
        load_lm_corpus(str(path))


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "device='tpu' is not valid here"),
    (["--n-clusters", "0"], "n_clusters must be a positive integer"),
])
def test_cli_bad_options_fail_before_torch_loads(argv, message):
    code = (f"import sys; from chameleon.__main__ import main; rc = main({['train', '--profile', 'smoke'] + argv}); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"] and message in done.stderr, done.stderr


def test_max_length_beyond_the_models_positions(tmp_path, gpt2_tiny):
    with pytest.raises(ValueError, match=r"max_length=100000 exceeds the 1024 positions of backbone 'gpt2-tiny'"):
        prepare(tiny(tmp_path, max_length=100000), *gpt2_tiny)


def test_tiny_validation_split_warns(tmp_path, gpt2_tiny):
    with pytest.warns(UserWarning, match="the validation split has only 3 examples, fewer than 2 batches of 8"):
        prepare(tiny(tmp_path, max_eval_examples=3), *gpt2_tiny)


def test_corpus_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_backbone", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ValueError, match="neither a corpus name"):
        train(tiny(tmp_path, corpus=str(tmp_path / "missing.txt")), progress=False)
