"""Sweeps (chameleon.experiments.sweeps): a table's plan for any scheduler, and the plan run as Ray tasks."""
import functools
import json
import shlex

import pandas as pd

from chameleon import __main__ as cli
from chameleon.experiments.compare import compare, experiment_runs
from chameleon.config import ROOT
from chameleon.runs import run_name
from chameleon.experiments.sweeps import plan_lines, steps

import conftest

tiny = functools.partial(conftest.tiny, epochs=1)
TINY_OPTIONS = ["--profile", "smoke", "--backbone", "gpt2-tiny", "--epochs", "1", "--max-train-examples", "32",
                "--max-eval-examples", "16"]  # conftest.tiny's fields, as options


def test_plan_lists_each_run_once_after_what_it_needs_and_its_commands_train_those_runs(tmp_path, capsys):
    cfg = tiny(tmp_path)
    configs = experiment_runs(cfg, "svf", seeds=2)
    records = [json.loads(line) for line in plan_lines(configs)]
    names = [r["run"] for r in records]
    assert len(names) == len(set(names)) == len(steps(configs)) and {run_name(c) for c in configs} <= set(names)
    assert all(set(r["needs"]) <= set(names[:i]) for i, r in enumerate(records))
    assert sum(bool(r["needs"]) for r in records) == 8  # classifier and cem x 2 protocols x 2 seeds need `oracle`
    parser = cli.build_parser()
    for r in records:  # the command line trains the very run of its record
        assert run_name(cli._config(parser.parse_args(shlex.split(r["command"])[3:]))) == r["run"]
    argv = ["compare", *TINY_OPTIONS, "--data-dir", str(tmp_path), "--results-dir", str(tmp_path / "results"),
            "--experiment", "svf", "--seeds", "2", "--plan", "--format", "commands"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [r["command"] for r in records]


def test_ray_with_two_workers_gives_the_rows_of_the_sequential_loop(tmp_path, monkeypatch):
    import ray  # here: its import takes seconds that the other tests need not wait for

    # chameleon: a plain run; lora_experts under `classifier`: a run that needs its `oracle` run first
    runs, protocols = [("chameleon", "batch_mean"), ("lora_experts", "classifier")], ("causal",)
    here = compare(tiny(tmp_path / "here"), runs=runs, protocols=protocols, progress=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the workers import this checkout
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # a test reports nothing anywhere
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one CPU, so one torch thread, per task
    try:
        there = compare(tiny(tmp_path / "ray"), runs=runs, protocols=protocols, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert len(here) == 2
    timing = [c for c in here.columns if c.startswith("seconds")]
    pd.testing.assert_frame_equal(here.drop(columns=timing), there.drop(columns=timing), rtol=1e-4)
