"""PEFT export: trained runs load in PEFT, in a fresh process that never imports the kit, and give the kit's
logits; chameleon runs as one named adapter per training cluster, routed as the kit routes."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import conftest  # pytest puts tests/ on sys.path
from chameleon.__main__ import main
from chameleon.backbones import load_backbone
from chameleon.serve.export import unexportable
from chameleon.serve.load_export import load
from chameleon.adapters.model import build
from chameleon.prepare import prepare
from chameleon.serve.adapter import Adapter

PROMPTS = ["The history of Rome begins with", "Photosynthesis turns light into", "Hello",
           "In 1854 the city of", "The quick brown fox jumps over the lazy dog"]
# the export's own loader, on its own: every name it imports is printed so that the kit's absence is checked
FRESH = """
import json, sys
import torch
from safetensors.torch import save_file
job = json.load(sys.stdin)
sys.path.insert(0, job["exports"][0])
from load_export import load, main, route
tensors, names = {}, {}
for i, folder in enumerate(job["exports"]):
    model, tokenizer, routing = load(folder)
    tokenizer.padding_side = "right"
    enc = tokenizer(job["prompts"], return_tensors="pt", padding=True)
    extra = {}
    if routing:
        names[i] = extra["adapter_names"] = route(model, tokenizer, job["prompts"], routing)
    with torch.no_grad():
        tensors[f"logits{i}"] = model(**enc, **extra).logits.contiguous()
        with model.disable_adapter():
            tensors[f"base{i}"] = model(**enc).logits.contiguous()
    tensors[f"ids{i}"], tensors[f"mask{i}"] = enc["input_ids"], enc["attention_mask"]
save_file(tensors, job["result"])
main([job["exports"][1], *job["prompts"][:2]])  # the command line a user runs: greedy answers through PEFT
print(json.dumps({"names": names, "modules": sorted(sys.modules)}))
"""


def built(tmp_path, regime: str) -> Adapter:
    """An untrained adapter in the authors' flavour (A and B random, never zero): exporting it maps every matrix
    as a trained run's would, without the training."""
    cfg = conftest.tiny(tmp_path, regime=regime, protocol="authors")
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed)
    adapted = build(cfg, model)
    with torch.no_grad():  # larger A and B than the init's 0.01: an update the logits show
        for p in adapted.parameters():
            if p.requires_grad:
                p.mul_(30)
    if adapted.experts is not None:  # served under the classifier dispatch, with prompt centroids made up here
        torch.manual_seed(0)
        adapted.head.prompt_centroids = torch.nn.functional.normalize(torch.randn(cfg.n_experts, 64), dim=1)
    return Adapter(adapted, tokenizer, cfg)


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """A trained `lora` run (authors' flavour: update x alpha) and `chameleon` run (causal), and built `lora_full`
    (LoRA in GPT-2's Conv1D blocks too) and `lora_experts` adapters, each exported; then all loaded with PEFT in
    one fresh process, which reads PROMPTS and a training line of each of the chameleon run's clusters."""
    tmp = tmp_path_factory.mktemp("export")
    adapters = {"lora": Adapter.from_run(trained_run("lora", protocol="authors"), device="cpu"),
                "chameleon": Adapter.from_run(trained_run("chameleon", protocol="causal"), device="cpu"),
                "lora_full": built(tmp, "lora_full"), "lora_experts": built(tmp, "lora_experts")}
    out = {regime: (adapter, adapter.export_peft(tmp / f"peft-{regime}")) for regime, adapter in adapters.items()}
    prompts = PROMPTS + conftest.line_per_cluster(adapters["chameleon"])
    job = {"exports": [str(folder) for _, folder in out.values()], "prompts": prompts, "result": str(tmp / "peft.st")}
    # no PYTHONPATH to the kit; one thread: a 2-layer model gains nothing from more, and two torch processes
    # spinning on the same cores slow each other several times over
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH], input=json.dumps(job), capture_output=True, text=True,
                          cwd=tmp, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    *answers, report = done.stdout.strip().splitlines()
    assert [line.split("] ")[1].split(" -> ")[0] for line in answers] == PROMPTS[:2]
    return out, load_file(job["result"]), {**json.loads(report), "prompts": prompts}


def test_the_fresh_process_never_imported_the_kit(exports):
    _, _, report = exports
    assert "peft" in report["modules"]
    assert not [m for m in report["modules"] if m == "chameleon" or m.startswith("chameleon.")]


def kit_inputs(adapter, tensors, i, prompts):
    ids, mask = tensors[f"ids{i}"], tensors[f"mask{i}"]
    ref = adapter.tokenizer(prompts, return_tensors="pt", padding=True)  # the exported tokenizer is the kit's
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    return ids, mask


def assert_peft_gives_the_kit_logits(exports, name):
    """The export of run `name`, whose logits through PEFT (the fresh process's) equal the kit's and differ from
    the bare backbone's; returns its folder."""
    runs, tensors, report = exports
    i = list(runs).index(name)
    adapter, folder = runs[name]
    ids, mask = kit_inputs(adapter, tensors, i, report["prompts"])
    kit = adapter.adapted.logits(adapter.adapted.hidden(ids, mask))
    torch.testing.assert_close(tensors[f"logits{i}"], kit, atol=1e-5, rtol=0)
    assert (tensors[f"logits{i}"] - tensors[f"base{i}"]).abs().max() > 1e-3  # the adapter does change the logits
    return folder


@torch.no_grad()
def test_lora_export_gives_the_kit_logits(exports):
    folder = assert_peft_gives_the_kit_logits(exports, "lora")
    meta = json.loads((folder / "export.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    # the authors' flavour scales the update by alpha: PEFT's lora_alpha / r with lora_alpha = alpha * r
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 4.0, ["lm_head"])
    assert meta["adapters"] == ["default"] and (folder / "base" / "tokenizer.json").is_file()
    assert "lm_head.base_layer.weight" not in str(load_file(folder / "adapter_model.safetensors").keys())


@torch.no_grad()
def test_lora_full_export_adapts_gpt2s_conv1d_blocks_as_the_kit(exports):
    folder = assert_peft_gives_the_kit_logits(exports, "lora_full")
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 9 and {"lm_head", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(targets)


@torch.no_grad()
def test_cluster_adapters_routed_by_peft_give_the_kit_head_conditioned_on_each_cluster(exports):
    runs, tensors, report = exports
    i = list(runs).index("chameleon")
    adapter, folder = runs["chameleon"]
    ids, mask = kit_inputs(adapter, tensors, i, report["prompts"])
    train, _, centroids = prepare(adapter.cfg, adapter.adapted.model, adapter.tokenizer)
    labels = adapter.assign_groups(adapter.embed(report["prompts"]), "route")  # the kit's routing of each prompt
    assert report["names"][str(i)] == [f"cluster_{c}" for c in labels]
    assert len(json.loads((folder / "routing.json").read_text())["centroids"]) == len(centroids) == 4
    # each row's cluster's mean conditioning vector, and the kit's head with one adapter per row
    conds = torch.stack([train.cond_emb[torch.from_numpy(train.labels == c)].mean(0) for c in labels])
    kit = adapter.adapted.logits(adapter.adapted.hidden(ids, mask), conds)
    torch.testing.assert_close(tensors[f"logits{i}"], kit, atol=1e-5, rtol=0)
    assert len(set(labels.tolist())) > 1  # several adapters in one batch


@torch.no_grad()
def test_expert_adapters_are_routed_as_the_classifier_dispatch(exports):
    runs, tensors, report = exports
    i = list(runs).index("lora_experts")
    adapter, _ = runs["lora_experts"]
    ids, mask = kit_inputs(adapter, tensors, i, report["prompts"])
    experts, hidden = adapter.adapted.head, adapter.adapted.hidden(ids, mask)
    emb = adapter.embed(report["prompts"], adapter.cfg.prefix_tokens)  # the classifier reads a line's first tokens
    chosen = [experts.choose(emb[row:row + 1]) for row in range(len(emb))]
    assert report["names"][str(i)] == [f"expert_{k}" for k in chosen]
    for k in set(chosen):  # the whole batch through expert k (the base head's product as PEFT forms it), its rows
        experts.selection = k
        rows = [row for row, c in enumerate(chosen) if c == k]
        torch.testing.assert_close(tensors[f"logits{i}"][rows], adapter.adapted.logits(hidden)[rows], atol=1e-5, rtol=0)


def test_a_changed_backbone_is_caught(exports, tmp_path):
    _, folder = exports[0]["lora"]
    meta = json.loads((folder / "export.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    meta["base"] = {**meta["base"], "path": str(folder / "base"), "sha256": "0" * 64}
    (copy / "export.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not the one the adapters were trained on"):
        load(copy)


def test_export_never_overwrites_and_refuses_what_it_cannot_export(exports, tmp_path, capsys):
    adapter, _ = exports[0]["lora"]
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ValueError, match="is not an export of the kit"):
        adapter.export_peft(mine, force=True)
    out = tmp_path / "out"
    assert main(["export", "--run", str(adapter.run), "--format", "peft", str(out)]) == 0
    assert "load it without the kit" in capsys.readouterr().out
    assert main(["export", "--run", str(adapter.run), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    adapter.export_peft(out, force=True)
    assert "SVF rescales the singular values" in unexportable("svf_experts")
    assert "trains no adapter" in unexportable("unadapted")
