"""Data-parallel training (chameleon.parallel) on the CPU: two processes joined by gloo, launched as torchrun
would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), against one process accumulating the same
batches. One thread per process and no dropout, so that both sides compute the same sums."""
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chameleon.runs import CHECKPOINT, run_dir
from chameleon.training import train

import conftest

ROOT = Path(__file__).resolve().parent.parent
# chameleon: a hypernetwork, conditioned in each process on that process's batch. 28 examples make 5 batches an
# epoch: with 2 a step, the last step has one, and the second process none.
SETTINGS = dict(regime="chameleon", epochs=2, hyper_dropout=0.0, device="cpu", max_train_examples=28)
tiny = partial(conftest.tiny, **SETTINGS)
TOLERANCE = 1e-5  # sums in another order may differ in the last bits (measured here: none, bit-identical)

# Each process trains the run until epoch 2 starts (epoch 1 is checkpointed), is interrupted, and resumes it.
WORKER = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import conftest
from chameleon import training
from chameleon.clustering import ClusterBatchSampler
cfg = conftest.tiny(Path(sys.argv[1]), results_dir=Path(sys.argv[1]) / "two", **json.loads(sys.argv[2]))
set_epoch = ClusterBatchSampler.set_epoch
def interrupted(self, epoch):
    if epoch == 1:
        raise KeyboardInterrupt
    set_epoch(self, epoch)
ClusterBatchSampler.set_epoch = interrupted
try:
    training.train(cfg, progress=False)
    raise AssertionError("the run was not interrupted")
except KeyboardInterrupt:
    ClusterBatchSampler.set_epoch = set_epoch
training.train(cfg, resume=True, progress=False)
"""


def launch(processes: int, *args: str, timeout: int = 300) -> None:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # this checkout's chameleon
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(processes)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # one that failed leaves the others waiting in a collective
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-4000:]}"


def only_run(results: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (run,) = (results / "smoke" / "lm" / "runs").iterdir()
    weights = {k: v for k, v in load_file(run / CHECKPOINT).items() if k.startswith("param.")}
    return json.loads((run / "metrics.json").read_text()), weights


def assert_same_run(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    assert [h["step"] for h in metrics_a["history"]] == [h["step"] for h in metrics_b["history"]]
    for key in ("val_loss", "train_loss"):
        assert [h[key] for h in metrics_a["history"]] == pytest.approx([h[key] for h in metrics_b["history"]],
                                                                        abs=TOLERANCE), key
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=TOLERANCE, msg=name)


def test_two_processes_train_as_one_accumulating_their_batches_and_resume_exactly(tmp_path):
    """The two processes' run is interrupted after epoch 1 and resumed; it must still end as one process that
    accumulates 2 batches a step and is never interrupted (a wrong resume or a wrong step would both show)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(tiny(tmp_path, accumulate=2, results_dir=tmp_path / "one"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [h["step"] for h in one["history"]] == [0, 3, 6]  # 5 batches an epoch, 2 a step
    launch(2, str(tmp_path), json.dumps(SETTINGS))
    assert_same_run(only_run(tmp_path / "two"), only_run(tmp_path / "one"))
    assert not run_dir(tiny(tmp_path, results_dir=tmp_path / "two")).exists()  # named apart from one process's


def test_bf16_is_refused_off_cuda_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="precision='bf16' runs on CUDA only.*use precision='fp32'"):
        train(tiny(tmp_path, regime="lora", precision="bf16"), progress=False)
