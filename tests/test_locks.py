"""A run folder's lock (chameleon.experiments.locks): a live holder blocks, a dead one's lock is taken over, and a worker
killed mid-run leaves a run that the next call finishes from its checkpoint."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from chameleon import training
from chameleon.config import ROOT
from chameleon.experiments.locks import RunLocked, _start_time, locked
from chameleon.runs import CHECKPOINT, finished, lock_path, run_dir
from chameleon.experiments.sweeps import train_step

import conftest


def _lock_of(path, pid, host=None, pid_start=None):
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "pid_start": pid_start or _start_time(pid), "since": time.time()}))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_blocks_until_it_dies_then_its_lock_is_taken_over(tmp_path, sleeper):
    path = tmp_path / "run.lock"
    _lock_of(path, sleeper.pid)
    with pytest.raises(RunLocked, match=rf"{path} is held by pid {sleeper.pid} on .*another worker is training"):
        with locked(path, wait=False):
            pass
    threading.Timer(0.5, lambda: (sleeper.kill(), sleeper.wait())).start()  # the holder dies while we wait
    t0 = time.perf_counter()
    with pytest.warns(UserWarning) as caught:
        with locked(path, poll=0.05) as lock:
            assert json.loads(path.read_text())["pid"] == os.getpid() and lock.took_over
    assert time.perf_counter() - t0 >= 0.5
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "waiting for it" in messages[0] and "its worker is gone" in messages[1]
    assert not path.exists() and not list(tmp_path.iterdir())  # released, no stale copy left


def test_a_lock_of_a_dead_or_reused_pid_is_stale_and_another_hosts_is_not(tmp_path, sleeper):
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "run.lock"
    for pid, start in ((dead.pid, "1"), (sleeper.pid, "1")):  # gone; alive but started at another time
        _lock_of(path, pid, pid_start=start)
        with pytest.warns(UserWarning, match="its worker is gone; taking the lock over"):
            with locked(path, wait=False) as lock:
                assert lock.took_over
    _lock_of(path, dead.pid, host="another-host")  # no way to tell from here
    with pytest.raises(RunLocked, match="on another-host"):
        with locked(path, wait=False):
            pass


def test_a_worker_killed_mid_run_leaves_a_run_that_the_next_call_finishes(tmp_path, monkeypatch):
    cfg = conftest.tiny(tmp_path, regime="lora", epochs=2)
    # The worker trains through the command line and stops after its first epoch's checkpoint, until it is killed.
    worker = f"""
import time, sys
from chameleon import __main__ as cli, training
save = training.save_checkpoint
def save_then_hang(out, adapted, opt, history, epoch, *rest):
    save(out, adapted, opt, history, epoch, *rest)
    time.sleep(600)
training.save_checkpoint = save_then_hang
cli.main(["train", "--profile", "smoke", "--backbone", "gpt2-tiny", "--regime", "lora", "--epochs", "2",
          "--max-train-examples", "32", "--max-eval-examples", "16", "--data-dir", {str(tmp_path)!r},
          "--results-dir", {str(tmp_path / "results")!r}])
"""
    proc = subprocess.Popen([sys.executable, "-c", worker], cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"},
                            stderr=subprocess.DEVNULL)
    try:
        while not (run_dir(cfg) / CHECKPOINT).exists():
            assert proc.poll() is None, "the worker ended before its first checkpoint"
            time.sleep(0.1)
        assert json.loads(lock_path(cfg).read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert finished(cfg) is None and lock_path(cfg).exists()
    resumed = []
    load = training.load_checkpoint
    monkeypatch.setattr(training, "load_checkpoint", lambda *a: resumed.append(1) or load(*a))
    with pytest.warns(UserWarning, match=f"pid {proc.pid} .* its worker is gone"):
        result = train_step(cfg, progress=False)
    # from the killed worker's checkpoint (test_training: a resumed run ends as if never interrupted)
    assert resumed and [h["epoch"] for h in result["history"]] == [0, 1, 2] and not lock_path(cfg).exists()
