"""The path of a user with the Hugging Face hub and a GPU, exercised here as far as it can be offline:
local files stand in for the hub's, and the meta device stands in for CUDA (an op that mixes a
meta tensor with a CPU one raises, so a forgotten `.to(device)` fails here, not on a GPU)."""
import datasets
import pytest
import torch
from datasets import Dataset

from chameleon import Config, assets, data
from chameleon.backbones import load_backbone
from chameleon.adapters.model import build
from chameleon.prepare import prepare
from chameleon.training import batch_loss, scored_rows, train


@pytest.fixture
def fake_hub(monkeypatch):
    """Answer `load_dataset(*hub_args)` with a local file in the hub dataset's own format."""
    real = datasets.load_dataset
    answers = {}
    monkeypatch.setattr(assets, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: real(**answers[args]))
    return answers


def test_a_saved_model_loads_through_the_hub_code_path(tmp_path):
    model, tok = load_backbone("gpt2-tiny")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_backbone(str(tmp_path))  # AutoModelForCausalLM / AutoTokenizer, as for "gpt2"
    ids = tok("Hello world, again.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert (tok2.pad_token, tok2.padding_side) == (tok2.eos_token, "right")


def test_wikitext_parquet_goes_through_the_hub_post_processing(tmp_path, fake_hub):
    # WikiText's schema: one "text" column of raw lines, blank separators, headings " = T = "
    lines = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing game .\n", ""]
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(tmp_path / f"{split}.parquet")
        Dataset.from_dict({"text": lines}).to_parquet(files[split])
    fake_hub[("wikitext", "wikitext-2-raw-v1")] = dict(path="parquet", data_files=files)
    corpus = data.load_lm_corpus("wikitext-2-raw-v1")
    assert set(corpus) == {"train", "validation", "test"}
    assert corpus["validation"]["text"] == [lines[1], lines[3]]  # blank lines hold no example


def test_alpaca_json_goes_through_the_instruction_post_processing(tmp_path, fake_hub):
    records = [{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else f"hint {i}", "output": "Blue."}
               for i in range(60)] + [{"instruction": "Empty answer.", "input": "", "output": ""}]
    path = tmp_path / "alpaca.json"
    Dataset.from_list(records).to_json(path)
    fake_hub[("yahma/alpaca-cleaned",)] = dict(path="json", data_files={"train": str(path)})
    with pytest.warns(UserWarning, match="dropped 1 of 61 records"):
        ds = data.load_instructions("alpaca")
    assert sum(len(ds[s]) for s in ds) == 60
    assert set(ds["train"].column_names) == {"instruction", "input", "output"}


def test_the_paper_profiles_shapes_run_end_to_end_on_gpt2_arch(tmp_path):
    cfg = Config.from_profile("hub", backbone="gpt2-arch", corpus="wiki", regime="chameleon", protocol="authors",
                              max_train_examples=32, max_eval_examples=8, epochs=1,  # one batch of 32 to train
                              data_dir=tmp_path, results_dir=tmp_path / "results")
    assert (cfg.max_length, cfg.batch_size, cfg.rank, cfg.lr) == (256, 32, 4, 5e-4)
    result = train(cfg, progress=False)
    assert result["trainable_params"] == 6_786_596  # the paper's ChamaleonLLM count
    assert [h["epoch"] for h in result["history"]] == [0, 1] and result["history"][1]["step"] == 1  # one step of 32


@pytest.mark.parametrize("regime", ["lora", "chameleon"])
def test_every_tensor_of_a_head_step_follows_the_model_to_its_device(tmp_path, regime):
    # the head path only: transformers' own mask code calls .item(), which a meta body cannot answer
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", regime=regime, protocol="causal", max_train_examples=16,
                              max_eval_examples=8, data_dir=tmp_path, results_dir=tmp_path / "results")
    model, tok = load_backbone(cfg.backbone)
    split, _, _ = prepare(cfg, model, tok)
    adapted = build(cfg, model)
    rows = scored_rows(adapted, split, True, cfg.cache_dir)  # hidden states cached on the CPU
    meta = torch.device("meta")
    loss, n = batch_loss(adapted.to(meta), split, rows, [0, 1, 2], [3, 4], meta)
    assert loss.device == meta and n > 0
