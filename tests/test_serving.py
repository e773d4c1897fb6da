"""Serving: batched greedy decoding against one-by-one `generation.greedy` and Hugging Face's generate,
the three groupings, prompt-only conditioning, loading a trained run, the CLI."""
import sys
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import conftest  # pytest puts tests/ on sys.path
from chameleon import training
from chameleon.serve import adapter as serving
from chameleon.__main__ import main
from chameleon.runs import CENTROIDS, run_dir
from chameleon.backbones import load_backbone
from chameleon.clustering import assign
from chameleon.config import Config
from chameleon.serve.decoding import batched_greedy, greedy, tokenize_prompts
from chameleon.adapters.model import build
from chameleon.serve.adapter import Adapter

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "In 1854 the city of",
           "Photosynthesis turns light into", "Once upon", "The history of Rome begins with a small town"]


tiny = partial(conftest.tiny, protocol="causal", max_train_examples=64, max_eval_examples=32)


def noisy(adapted):
    """Large random weights everywhere: outputs then vary token to token, and depend on positions and on
    the adapter (a freshly initialised gpt2-tiny repeats one token, which would prove little)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return adapted.eval()


def built(regime: str, protocol: str = "causal"):
    model, tok = load_backbone("gpt2-tiny")
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", regime=regime, protocol=protocol)
    return noisy(build(cfg, model)), tok, cfg


@pytest.mark.parametrize("regime", ["unadapted", "lora", "chameleon", "lora_experts"])
def test_batched_decoding_equals_one_by_one_greedy(regime):
    adapted, tok, cfg = built(regime)
    ids = tokenize_prompts(tok, PROMPTS, cfg.max_length)
    groups = [1, 0, 2, 0, 1, 2]
    conds = F.normalize(torch.randn(3, 64), dim=1) if adapted.conditioned else None
    selections = [2, 0, 1] if adapted.experts is not None else None  # LoRA experts: each group's expert

    def alone(i, eos):  # one prompt at a time, with its group's vector or expert
        if selections is not None:
            adapted.head.selection = selections[groups[i]]
        return greedy(adapted, torch.tensor(ids[i]), 10, eos, None if conds is None else conds[groups[i]])

    free = [alone(i, None) for i in range(len(ids))]
    assert batched_greedy(adapted, ids, 10, None, tok.pad_token_id, conds, groups, selections) == free
    eos = free[2][4]  # an EOS that stops some rows early: they end before it, the others go on
    ref = [alone(i, eos) for i in range(len(ids))]
    assert any(len(r) < 10 for r in ref) and any(len(r) == 10 for r in ref)
    assert batched_greedy(adapted, ids, 10, eos, tok.pad_token_id, conds, groups, selections) == ref
    if adapted.conditioned:  # the per-group vector does condition each row
        assert batched_greedy(adapted, ids, 10, None, tok.pad_token_id, conds.flip(0), groups) != free
    if selections is not None:  # ... and so does the per-group expert
        assert batched_greedy(adapted, ids, 10, None, tok.pad_token_id, None, groups, selections[::-1]) != free


def test_unadapted_batch_equals_hugging_face_generate():
    adapted, tok, cfg = built("unadapted")
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = adapted.model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1]:].tolist()
    assert batched_greedy(adapted, tokenize_prompts(tok, PROMPTS, 64), 12, None, tok.pad_token_id) == ref


def test_one_prompt_and_empty_batches():
    adapted, tok, _ = built("lora")
    ids = tokenize_prompts(tok, PROMPTS[:1], 32)
    assert batched_greedy(adapted, ids, 5, None, tok.pad_token_id) == [greedy(adapted, torch.tensor(ids[0]), 5, None)]
    assert batched_greedy(adapted, [], 5, None, tok.pad_token_id) == []
    with pytest.raises(ValueError, match="needs one conditioning vector"):
        batched_greedy(built("chameleon")[0], ids, 5, None, tok.pad_token_id)


def direct_adapter(regime="chameleon", protocol="causal", **cfg_overrides) -> Adapter:
    adapted, tok, cfg = built(regime, protocol)
    cfg = cfg.replace(**cfg_overrides)
    torch.manual_seed(3)
    centroids = F.normalize(torch.randn(4, 64), dim=1).numpy()
    return Adapter(adapted, tok, cfg, centroids)


def prompt_mean(adapter: Adapter, text: str) -> torch.Tensor:
    """The reference: the normalised mean of the prompt's token embeddings (real tokens only)."""
    ids = torch.tensor(adapter.tokenizer(text)["input_ids"])
    return F.normalize(adapter.adapted.model.get_input_embeddings().weight[ids].mean(0), dim=0)


def test_groups_route_kmeans_single():
    adapter = direct_adapter(batch_size=2)
    prompts = PROMPTS + PROMPTS[:2]  # repeated prompts land in the same group under every mode
    emb = adapter.embed(prompts)
    route = adapter.assign_groups(emb, "route")
    assert route.tolist() == assign(emb, adapter.centroids).tolist()
    kmeans = adapter.assign_groups(emb, "kmeans")
    assert len(set(kmeans.tolist())) == math.ceil(len(prompts) / 2) == 4
    assert adapter.assign_groups(emb, "kmeans", n_groups=2).max() == 1
    assert adapter.assign_groups(emb, "single").tolist() == [0] * len(prompts)
    # serving's words are the batchings of evaluation (regimes.GROUP_WORDS); their own names work too
    assert adapter.assign_groups(emb, "clustered").tolist() == route.tolist()
    assert adapter.assign_groups(emb, "mixed").tolist() == [0] * len(prompts)
    for labels in (route, kmeans):
        assert labels[6] == labels[0] and labels[7] == labels[1]
    for mode, labels in [("route", route), ("kmeans", kmeans), ("single", np.zeros(8, int))]:
        results = adapter.generate(prompts, max_new_tokens=3, group=mode)
        assert [r.group for r in results] == labels.tolist()
        assert [r.group_size for r in results] == [int((labels == g).sum()) for g in labels]
        assert [r.prompt for r in results] == prompts
    with pytest.raises(ValueError, match="group="):
        adapter.generate(prompts, group="nearest")


@pytest.mark.parametrize("protocol", ["causal", "authors"])
def test_conditioning_is_the_mean_of_the_group_prompts_embeddings(protocol, monkeypatch):
    adapter = direct_adapter(protocol=protocol)
    seen = {}
    real = serving.batched_greedy

    def spy(adapted, prompts, max_new_tokens, eos_id, pad_id, conds=None, groups=None, selections=None):
        seen.update(prompts=prompts, conds=conds, groups=groups)
        return real(adapted, prompts, max_new_tokens, eos_id, pad_id, conds, groups, selections)

    monkeypatch.setattr(serving, "batched_greedy", spy)
    results = adapter.generate(PROMPTS, max_new_tokens=4, group="kmeans", n_groups=2)
    wte = adapter.adapted.model.get_input_embeddings().weight
    for g in {r.group for r in results}:
        members = [r.prompt for r in results if r.group == g]
        if protocol == "causal":
            emb = torch.stack([prompt_mean(adapter, p) for p in members])
        else:  # the authors' mean: over max_length positions, right padding (EOS) included
            L, pad = adapter.cfg.max_length, adapter.tokenizer.pad_token_id
            rows = [adapter.tokenizer(p)["input_ids"] for p in members]
            emb = torch.stack([F.normalize(wte[torch.tensor(r + [pad] * (L - len(r)))].mean(0), dim=0) for r in rows])
        index = seen["groups"][[r.prompt for r in results].index(members[0])]
        torch.testing.assert_close(seen["conds"][index], emb.mean(0), atol=1e-6, rtol=1e-5)
    # ... and each row decodes as one-by-one greedy with its group's vector
    for i, r in enumerate(results):
        cond = seen["conds"][seen["groups"][i]]
        assert r.tokens == greedy(adapter.adapted, torch.tensor(seen["prompts"][i]), 4, adapter.tokenizer.eos_token_id, cond)


def test_prefix_conditioning_sees_only_the_first_tokens(monkeypatch):
    adapter = direct_adapter(conditioning="prefix", prefix_tokens=2)
    conds = adapter.conditions(PROMPTS[:1], np.zeros(1, dtype=np.int64))
    ids = torch.tensor(adapter.tokenizer(PROMPTS[0])["input_ids"][:2])
    ref = F.normalize(adapter.adapted.model.get_input_embeddings().weight[ids].mean(0), dim=0)
    torch.testing.assert_close(conds[0], ref, atol=1e-6, rtol=1e-5)


class FactoryCalls(TorchFunctionMode):
    """Records the tensor factories called from chameleon/serve/adapter.py and decoding.py, with their device."""
    FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty, torch.tensor, torch.arange, torch.randn,
                 torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            caller = sys._getframe(1).f_code
            if Path(caller.co_filename).name in ("adapter.py", "decoding.py"):
                self.calls.append((func.__name__, caller.co_name, kwargs.get("device")))
        return func(*args, **kwargs)


def test_decode_path_names_the_model_device_for_every_tensor_it_creates():
    """Without a GPU here the tensors are all on the CPU anyway; what is checked is that every tensor
    serving.py and generation.py create for the model names its device, so nothing silently lands on the CPU on CUDA."""
    adapter = direct_adapter()
    with FactoryCalls() as mode:
        adapter.generate(PROMPTS, max_new_tokens=3, group="kmeans")
    assert {fn for _, fn, _ in mode.calls} >= {"batched_greedy", "prompt_embeddings"}
    assert all(dev == adapter.device for _, _, dev in mode.calls), mode.calls


# --- a trained run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    out = {}
    for regime in ("unadapted", "lora", "chameleon", "chameleon_full", "lora_matched"):
        cfg = tiny(tmp, regime=regime)
        training.train(cfg, progress=False)
        out[regime] = run_dir(cfg)
    return out


@pytest.mark.parametrize("regime", ["unadapted", "lora", "chameleon", "chameleon_full", "lora_matched"])
def test_from_run_loads_the_trained_weights_and_centroids(runs, regime):
    run = runs[regime]
    adapter = Adapter.from_run(run, device="cpu")
    assert adapter.cfg.regime == regime and adapter.cfg.hyper_hidden == (64, 32)
    assert isinstance(adapter.cfg.data_dir, Path) and adapter.device == torch.device("cpu")
    params = dict(adapter.adapted.named_parameters())
    stored = {}
    if regime != "unadapted":
        from safetensors.torch import load_file
        stored = {k[len("param."):]: v for k, v in load_file(run / "checkpoint.safetensors").items()
                  if k.startswith("param.")}
    assert stored.keys() == {n for n, p in params.items() if p.requires_grad}
    for name, value in stored.items():
        assert torch.equal(params[name], value), name
    assert adapter.adapter_bytes()["trained"] == sum(v.numel() * 4 for v in stored.values())
    # the centroids stored by training, and the same recomputed from the config for older runs
    assert adapter.centroids.shape == (64 // 8, 64)
    (run / CENTROIDS).rename(run / "stored.safetensors")
    try:
        np.testing.assert_allclose(Adapter.from_run(run, device="cpu").centroids, adapter.centroids, atol=1e-6)
    finally:
        (run / "stored.safetensors").rename(run / CENTROIDS)


def test_a_served_run_answers_as_one_by_one_greedy(runs):
    adapter = Adapter.from_run(runs["chameleon"], device="cpu")
    results = adapter.generate(PROMPTS, max_new_tokens=6, group="route")
    emb = adapter.embed(PROMPTS)
    tok = adapter.tokenizer
    for r in results:
        members = [i for i, s in enumerate(results) if s.group == r.group]
        cond = emb[members].mean(0)
        ids = torch.tensor(tok(r.prompt)["input_ids"][-adapter.cfg.max_length:])
        assert r.tokens == greedy(adapter.adapted, ids, 6, tok.eos_token_id, cond)
        assert r.text == tok.decode(r.tokens, skip_special_tokens=True).strip()
        assert r.stopped == (len(r.tokens) < 6)


def test_from_run_errors_are_clear(runs, tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        Adapter.from_run(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        Adapter.from_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "metrics.json"):
        (broken / name).write_text((runs["lora"] / name).read_text())
    with pytest.raises(ValueError, match="has no checkpoint.safetensors"):
        Adapter.from_run(broken, device="cpu")
    (broken / "checkpoint.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is unreadable"):
        Adapter.from_run(broken, device="cpu")
    (broken / "checkpoint.safetensors").write_bytes((runs["chameleon"] / "checkpoint.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit this model"):
        Adapter.from_run(broken, device="cpu")
    metrics = json.loads((broken / "metrics.json").read_text())
    (broken / "metrics.json").write_text(json.dumps({**metrics, "finished": False}))
    with pytest.raises(ValueError, match="holds no finished run"):
        Adapter.from_run(broken, device="cpu")
    (broken / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Adapter.from_run(broken, device="cpu")


def test_cli_generate_prints_each_prompts_group_and_answer(runs, tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text("Photosynthesis turns light into\n\nOnce upon\n")
    assert main(["generate", "--run", str(runs["chameleon"]), "Hello there", "--prompts-file", str(file),
                 "--group", "kmeans", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for prompt in ("Hello there", "Photosynthesis turns light into", "Once upon"):
        assert f"prompt: {prompt}" in out
    assert out.count("[group ") == 3
    assert main(["generate", "--run", str(tmp_path / "nowhere"), "Hi"]) == 2
    assert "not a run folder" in capsys.readouterr().err
