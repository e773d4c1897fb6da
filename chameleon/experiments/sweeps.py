"""Sweeps: the runs of a table as a plan that any scheduler can run, a worker's step under its run's
lock, and the plan run as Ray tasks.

    python -m chameleon compare --profile cpu --seeds 3 --plan > plan.jsonl        # one JSON record a line
    python -m chameleon compare --profile cpu --seeds 3 --plan --format commands   # one `train` command a line
    python -m chameleon compare --profile cpu --seeds 3 --engine ray               # a cluster: set RAY_ADDRESS

A plan holds every run once, after the runs it needs (`runs.plan`: an experts run under a dispatch
chosen at inference evaluates the experts that its `oracle` run trained). A record is
{"run": its name, "needs": the names of the runs it needs, "command": its `train` command line,
"config": every Config field}. A command trains what its run needs first, under their locks, so
commands may also run in any order. Every worker must see the same results folder (a run reads the
checkpoint of the run it needs, and the locks live there: see chameleon.experiments.locks for what they rely on
on a shared filesystem); sharing data/cache too saves each worker the body's hidden states.
"""
from __future__ import annotations

import json
import shlex

from chameleon.config import Config
from chameleon.experiments.locks import locked
from chameleon.runs import finished, lock_path, plan, run_name

ENGINES = ("local", "ray")
FORMATS = ("jsonl", "commands")


def steps(configs: list[Config]) -> list[Config]:
    """Every run that `configs` need, each once, every run after the runs it needs."""
    unique = {}
    for cfg in configs:
        for step in plan(cfg):
            unique.setdefault(run_name(step), step)
    return list(unique.values())


def command(cfg: Config) -> str:
    """The `train` command line of cfg's run: its profile, task and every field changed from them."""
    base = Config.from_profile(cfg.profile, task=cfg.task).to_dict()
    words = ["python", "-m", "chameleon", "train", "--profile", cfg.profile, "--task", cfg.task]
    for key, value in cfg.to_dict().items():
        if key in ("profile", "task") or value == base[key]:
            continue
        if value is None or isinstance(value, list):  # the command line has no way to say these
            raise ValueError(f"{key}={value!r} differs from profile {cfg.profile!r} and `train` has no option for "
                             f"it, so no command line can run this plan; set {key} in the profile instead")
        words += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(words + ["--resume"])  # a job that is run again goes on from its checkpoint


def plan_lines(configs: list[Config], form: str = "jsonl") -> list[str]:
    """The plan of `configs` (steps), one line per run: a JSON record, or (form "commands") a command."""
    lines = []
    for step in steps(configs):
        if form == "commands":
            lines.append(command(step))
        else:
            lines.append(json.dumps({"run": run_name(step), "needs": [run_name(s) for s in plan(step)[:-1]],
                                     "command": command(step), "config": step.to_dict()}))
    return lines


def train_step(cfg: Config, resume: bool = False, wait: bool = True, progress: bool = True) -> dict:
    """Train cfg's run holding its lock; returns its metrics. A finished run is read back; while a live worker
    trains it, wait (or, with wait=False, raise locks.RunLocked); a killed worker's run goes on from its last
    checkpoint whatever `resume` says."""
    from chameleon import parallel
    from chameleon.training import train  # torch: only once there is a run to train

    done = finished(cfg)
    if done is not None:
        return done
    if not parallel.is_main():  # a data-parallel run is locked by its main process; the others follow it
        return train(cfg, resume=resume, progress=progress)
    with locked(lock_path(cfg), wait=wait) as lock:
        return train(cfg, resume=resume or lock.took_over, progress=progress)


def execute(plan_steps: list[Config], engine: str = "local", progress: bool = True) -> dict[str, dict]:
    """Run the steps of a plan (every run after the runs it needs) here one after the other, or as Ray
    tasks; returns each run's metrics by run name."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {list(ENGINES)}")
    if engine == "ray":
        return run_ray(plan_steps)
    return {run_name(step): train_step(step, progress=progress) for step in plan_steps}


def train_plan(cfg: Config, progress: bool = True) -> list[dict]:
    """The metrics of every run of cfg's plan (cfg's own last), each trained here under its lock or read back."""
    return list(execute(plan(cfg), progress=progress).values())


def run_ray(plan_steps: list[Config]) -> dict[str, dict]:
    """The steps as Ray tasks: one CPU each (Ray sets OMP_NUM_THREADS to it, so torch uses one thread) and one
    GPU each where the cluster has GPUs; a run starts once the runs it needs have finished. Uses the Ray this
    process has initialised, else connects to $RAY_ADDRESS, else starts a local Ray and stops it at the end.
    Every node needs the kit installed (`pip install .[cluster]`) and the results folder mounted."""
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'chameleon-kit[cluster]' (or ray==2.60.0)") from None
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)  # reads RAY_ADDRESS
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_ray_step)
        refs = {}
        for step in plan_steps:  # a task given the refs of the runs it needs starts once they are done
            refs[run_name(step)] = task.remote(step, *[refs[run_name(s)] for s in plan(step)[:-1]])
        return dict(zip(refs, ray.get(list(refs.values()))))
    finally:
        if started:
            ray.shutdown()


def _ray_step(cfg: Config, *needed: dict) -> dict:
    """One Ray task; `needed` (the results of the runs it needs) is there only to make Ray wait for them."""
    return train_step(cfg, progress=False)
