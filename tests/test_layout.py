"""The package's layout and its recipes: the three wings and what stays at the top, the old public paths, every
committed run keeps its name, one vocabulary per axis (no module compares an axis's names), and
docs/architecture.md's recipes (a conditioning, an adapter kind, a dispatch, an experiment row) each add a toy row
that trains."""
import ast
import dataclasses
import functools
import re
from pathlib import Path

import pandas as pd
import pytest

import conftest
from chameleon import regimes, runs as runs_module
from chameleon.adapters import model as model_module
from chameleon.adapters.experts import Experts
from chameleon.adapters.lora import LoRA
from chameleon.config import ROOT, TASKS, Config
from chameleon.experiments import compare, domains, domains_control as dc
from chameleon.regimes import Conditioning, Dispatch, Regime
from chameleon.runs import run_dir
from chameleon.training import train

tiny = functools.partial(conftest.tiny, max_train_examples=24, max_eval_examples=16)


def test_three_wings_and_a_short_top():
    package = ROOT / "chameleon"
    assert len(list(package.glob("*.py"))) <= 20
    for wing in ("adapters", "experiments", "serve"):
        assert len([p for p in (package / wing).glob("*.py") if p.name != "__init__.py"]) >= 3


def test_the_old_public_paths_still_work():
    from chameleon.compare import compare as old_compare
    from chameleon.serve.adapter import Adapter
    from chameleon.serving import Adapter as OldAdapter
    from chameleon.training import train as old_train

    assert OldAdapter is Adapter and old_compare is compare.compare and old_train is train


def test_every_committed_run_keeps_its_name(monkeypatch):
    """tests/data/run_names.csv: the name the kit gave every configuration of the committed tables before the
    layout step (the data fingerprint fixed, so that a name depends on the code alone)."""
    monkeypatch.setattr(runs_module, "fingerprint", lambda name: f"fixed:{name}")
    names = []
    for profile, task, experiment in [("cpu", "lm", "all"), ("cpu", "instructions", "all"), ("cpu", "lm", "svf"),
                                      ("cpu", "lm", "paper-length"), ("study", "lm", "heads")]:
        for c in compare.experiment_runs(Config.from_profile(profile, task=task), experiment, 3):
            names += [(f"{profile}/{task}/{experiment}", runs_module.run_name(s)) for s in runs_module.plan(c)]
    cfg = Config.from_profile("domains")
    for r in pd.read_csv(ROOT / "results/domains/lm/runs.csv").itertuples():
        c = domains.row_config(cfg, domains.ROWS[r.row], int(r.seed), None if pd.isna(r.lr) else float(r.lr))
        names += [("domains/lm", runs_module.run_name(s)) for s in runs_module.plan(c)]
    got = pd.DataFrame(names, columns=["table", "name"]).drop_duplicates().reset_index(drop=True)
    assert got.equals(pd.read_csv(Path(__file__).parent / "data" / "run_names.csv"))


# Where a word of an axis may be compared, and why: the word there is another vocabulary's that happens to be spelt
# alike. Files another helper owns in issue 33's second step are listed until they read their tables too.
SPELT_ALIKE = {
    ("chameleon/__main__.py", "reinforce"): "the `reinforce` command's name, not Config.objective",
    ("chameleon/adapters/lora.py", "head"): "add_lora's placement (lora.WHERE), not Regime.experts",
    ("chameleon/experiments/sweeps.py", "task"): "Config field names (profile, task), not the `task` conditioning",
    ("chameleon/prepare.py", "full"): "the key of the texts tokenized already (data.load_split_texts), not a row",
}
DISPLAY_FIELDS = {"colour", "about", "linestyle", "hatch", "marker"}  # what figures and tables show, never tested


def axis_words() -> set[str]:
    """Every name of an axis table of regimes.py, every string a row's field holds (not how it is displayed), and
    serving's words for the batchings; not the tasks (config.TASKS), which a row may name but no table lists."""
    words = set(regimes.GROUPINGS)
    for table in (regimes.REGIMES, regimes.PROTOCOLS, regimes.CONDITIONINGS, regimes.LEVELS, regimes.DISPATCHES,
                  regimes.BATCHINGS, regimes.OBJECTIVES):
        for name, row in table.items():
            words |= {name} | {v for f in dataclasses.fields(row) if f.name not in DISPLAY_FIELDS
                               and isinstance(v := getattr(row, f.name), str) and v}
    return words - set(TASKS)


def compared_strings(tree: ast.AST):
    """(line, string) of every string constant compared: either side of ==, !=, is; the literal collection on the
    right of `in`; the list of a pandas `.isin([...])`. A string on the left of `in` tests a key or a substring."""
    def constants(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for e in node.elts:
                yield from constants(e)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for op, (left, right) in zip(node.ops, zip(sides, sides[1:])):
                checked = [right] if isinstance(op, (ast.In, ast.NotIn)) else [left, right]
                yield from ((node.lineno, w) for side in checked for w in constants(side))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "isin":
            yield from ((node.lineno, w) for arg in node.args for w in constants(arg))


def test_one_vocabulary_per_axis():
    """No module outside the tables (regimes.py, and config.py that validates a Config against them) compares an axis's
    name or a row's value as a string: it reads the row's fields and properties (`regime.svf_blocks`, not
    `regime.blocks == "svf"`), so that renaming or adding a row touches regimes.py alone."""
    words, found = axis_words(), []
    quoted = re.compile("[\"']({})[\"']".format("|".join(map(re.escape, sorted(words)))))  # files worth parsing
    for path in sorted((ROOT / "chameleon").rglob("*.py")):
        name, text = path.relative_to(ROOT).as_posix(), path.read_text()
        if name in ("chameleon/regimes.py", "chameleon/config.py") or not quoted.search(text):
            continue
        found += [f"{name}:{line}: {word!r}" for line, word in compared_strings(ast.parse(text))
                  if word in words and (name, word) not in SPELT_ALIKE]
    assert not found, "read the row's field or property instead of comparing its name:\n" + "\n".join(found)


def test_recipe_a_conditioning_is_one_row(tmp_path, monkeypatch):
    """docs/architecture.md: a conditioning is a row of regimes.CONDITIONINGS; this one pools like `constant`."""
    monkeypatch.setitem(regimes.CONDITIONINGS, "toy_mean", Conditioning(
        "toy_mean", ("lm",), "full", False, False, False, False, "", "-", "o", "the training mean", pool="all"))
    toy, constant = (tiny(tmp_path, regime="chameleon", conditioning=c) for c in ("toy_mean", "constant"))
    assert run_dir(toy).name.startswith("chameleon-causal-toy_mean-")
    assert train(toy, progress=False)["val_loss"] == pytest.approx(train(constant, progress=False)["val_loss"], abs=1e-6)


def test_recipe_an_adapter_kind_is_one_builder(tmp_path, monkeypatch):
    """docs/architecture.md: a head kind is an entry of adapters.model.HEADS named by a regime row."""
    def doubled(cfg, model, flavour, k):  # LoRA with twice the step size
        return LoRA(model.get_output_embeddings(), cfg.rank, 2 * cfg.alpha, flavour, generator=cfg.seed)

    monkeypatch.setitem(model_module.HEADS, "doubled", doubled)
    monkeypatch.setitem(regimes.REGIMES, "toy_lora", Regime("toy_lora", "doubled", "frozen", "#000000", "a toy"))
    cfg = tiny(tmp_path, regime="toy_lora")
    result = train(cfg, progress=False)
    assert result["trainable_params"] == train(tiny(tmp_path, regime="lora"), progress=False)["trainable_params"]
    assert result["history"][-1]["val_loss"] != result["history"][0]["val_loss"]


def test_recipe_a_dispatch_is_one_row_and_one_method(tmp_path, monkeypatch):
    """docs/architecture.md: a dispatch is a row of regimes.DISPATCHES and an Experts._by_<name> method; like every
    dispatch but the training one, it evaluates the experts trained under the training dispatch."""
    monkeypatch.setitem(regimes.DISPATCHES, "first", Dispatch("first", False, False, False, "always expert 0"))
    monkeypatch.setattr(Experts, "_by_first", lambda self, adapted, split, batch: 0, raising=False)
    cfg = tiny(tmp_path, regime="lora_experts", dispatch="first", n_experts=2)
    for step in runs_module.plan(cfg):
        result = train(step, progress=False)
    assert result["dispatch"] == "first" and result["experts_from"] == run_dir(cfg.replace(dispatch="oracle")).name


def test_recipe_an_experiment_row_is_one_row(tmp_path, monkeypatch):
    """docs/architecture.md: an experiment row is a Row of the experiment's ROWS; a row tuned as another takes its
    chosen settings, and run_seeds trains it into runs.csv and lines/."""
    monkeypatch.setattr(dc, "ROWS", {"lora": dc.ROWS["lora"],
                                     "lora_rank2": domains.Row("lora_rank2", dict(regime="lora", rank=2), tuned_as="lora")})
    cfg = tiny(tmp_path, score_from=4, batchings=("clustered",))
    out = domains.folder(cfg)
    out.mkdir(parents=True)
    pd.DataFrame([dict(row="lora", recipe="-", lr=1e-2, dev_loss=3.0, status="ok")]).to_csv(out / "lr-grid.csv", index=False)
    pd.DataFrame([dict(recipe="paper", lr=1e-3, prefix=3, constant=3, separable=3, control=0, passes=False)]).to_csv(
        out / "recipes.csv", index=False)
    pd.DataFrame([dict(row="lora", recipe="-", lr=1e-2, epoch=1, dev_loss=3.0)]).to_csv(out / "epochs.csv", index=False)
    table = dc.run_seeds(cfg, seeds=1, progress=False)
    assert list(table.row) == ["lora", "lora_rank2"] and (table.lr == 1e-2).all()
    assert table.trainable_params.iloc[1] * 2 == table.trainable_params.iloc[0]
    assert (out / "lines" / "lora_rank2-seed0.csv").is_file()
