"""Shared fixtures, and `tiny`, the tests' one config factory. A test file binds the defaults it needs,
    import conftest  # pytest puts tests/ on sys.path
    tiny = functools.partial(conftest.tiny, epochs=2)
and calls tiny(tmp_path, regime=..., ...) as before."""
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chameleon import Config
from chameleon.backbones import load_backbone

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores, and so do the notebook
# kernels and subprocesses it starts (they inherit OMP_NUM_THREADS): two workers of 2 threads on 2 cores would each
# run several times slower than one.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    threads = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)

# Notebooks 03-06 and 09 train and read back the same smoke runs (06 reads 03-05's, 09 trains what 04 did): they
# run in order on one worker. Every other file is a unit of its own, so that a notebook's cells run in order in
# its kernel and a module's fixtures are built once. (xdist's own `--dist loadgroup` cannot do this under pytest 9:
# it renames node ids, which pytest 9 no longer lets it do.)
SHARED_RUNS = ("03_", "04_", "05_", "06_", "09_")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            file = nodeid.split("::", 1)[0]
            shares = file.endswith(".ipynb") and os.path.basename(file).startswith(SHARED_RUNS)
            return "notebooks with shared runs" if shares else file
    return ByFile(config, log)


def tiny(tmp_path, **overrides) -> Config:
    """The smoke profile on gpt2-tiny (GPT-2's real tokenizer and Conv1D blocks, 2 layers), reading and writing
    under tmp_path, on a small slice of the data: a run takes seconds. Overrides go through Config.from_profile,
    so a task's overrides (e.g. max_length 48 for instructions) still apply. Run names hash the whole config:
    a file that needs other defaults passes them, rather than this function changing them."""
    return Config.from_profile("smoke", **{"backbone": "gpt2-tiny", "data_dir": tmp_path,
                                           "results_dir": tmp_path / "results", "epochs": 1,
                                           "max_train_examples": 32, "max_eval_examples": 16, **overrides})


@pytest.fixture(scope="module")
def gpt2_tiny():
    """(model, tokenizer) of load_backbone("gpt2-tiny"), loaded once per test module: 2 layers, width 64."""
    return load_backbone("gpt2-tiny")


@pytest.fixture
def tiny_gpt2():
    """A 2-layer GPT-2 with GPT-2's real vocabulary (50,257) and Conv1D blocks, seeded; width 32, fresh per test."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()


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
