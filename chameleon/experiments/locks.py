"""A run is locked while it trains, so that two workers of a sweep never train the same run at once.

    with locked(runs.lock_path(cfg)) as lock:   # waits while a live worker holds it
        train(cfg, resume=lock.took_over)         # a killed worker's run goes on from its checkpoint

The lock is a file beside the run folder (runs/<name>.lock), created with O_CREAT | O_EXCL, so that
of several workers exactly one creates it; it holds the holder's host, pid, the pid's start time
and the wall-clock time it was taken, and is removed when the holder leaves the `with` block, however
it leaves it (an exception, Ctrl-C). A worker killed outright (SIGKILL, the OOM killer) leaves it
behind. A lock is stale when its host is this host and its pid is gone, a zombie, or a process that
started at another time (the pid was reused); the next worker takes a stale lock over.

What it relies on, and what that means on a shared filesystem:
- O_EXCL creation is atomic. It is on local filesystems and on NFS v3 and later (Linux clients
  since 2.6.5), not on NFS v2 nor on object-store mounts (s3fs, gcsfuse): there two workers can
  both take the lock and train the same run (the result is still right, the work is done twice).
- A pid can only be checked on the host that wrote it. A lock from another host is never judged
  stale: if that host's worker was killed, a worker elsewhere waits (or skips) until a worker on
  that host takes the lock over or someone deletes the file; the message that says it waits names
  the file and its holder. Hosts are told apart by name: containers that share a hostname and a
  filesystem but not a pid namespace must not run the same sweep.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from chameleon.config import RunFailed


UNWRITTEN_AFTER = 10.0  # seconds: a lock file still empty after this was left by a worker killed while writing it


class RunLocked(RunFailed):
    """The run is being trained by a live worker and the caller chose not to wait."""


@dataclass
class Lock:
    took_over: bool  # a killed worker's lock was taken over: its run has a checkpoint to resume from


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, with its state (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ", which may hold spaces
    return f"{fields[19]}{'Z' if fields[0] in 'ZX' else ''}"  # field 22 (starttime); a zombie is dead


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid), "since": time.time()}


def _stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    start, then = _start_time(holder["pid"]), holder.get("pid_start")
    return None not in (start, then) and start != then  # alive, but another process (the pid was reused)


def _take(path: Path) -> str | None:
    """Create the lock file; returns what it holds, or None when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    text = json.dumps(_holder())
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return text


def _break(path: Path, seen: str) -> None:
    """Remove the stale lock whose text was `seen`. It is first renamed to a name of this process's own: of
    two workers that judged it stale, one rename wins; the other finds nothing, or a newer lock, to rename."""
    grave = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if grave.read_text() != seen:  # a live worker took the lock between our read and the rename: give it back
        with contextlib.suppress(FileExistsError):  # unless a third took it since: two then train it, both right
            os.link(grave, path)
    grave.unlink()


def _describe(path: Path, holder: dict | None) -> str:
    if holder is None:
        return f"{path} is an unreadable lock file older than {UNWRITTEN_AFTER:.0f} s"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"{path} is held by pid {holder.get('pid')} on {holder.get('host')} since {since}"


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, poll: float = 2.0):
    """Hold the lock file `path` for the `with` block; yields a Lock.

    Args:
        path: the lock file (its folder is created).
        wait: while a live worker holds it, wait (True) or raise RunLocked (False).
        poll: seconds between two looks at a held lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    took_over, warned = False, False
    while (mine := _take(path)) is None:
        try:
            seen, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released since we tried: try again
            continue
        try:
            holder = json.loads(seen)
        except json.JSONDecodeError:  # being written, or its writer was killed between creating and writing it
            holder = None
        if (holder is None and age > UNWRITTEN_AFTER) or (holder is not None and _stale(holder)):
            warnings.warn(f"{_describe(path, holder)}: its worker is gone; taking the lock over, the run "
                          "resumes from its last checkpoint", stacklevel=3)
            _break(path, seen)
            took_over = True
            continue
        if holder is not None and not wait:
            raise RunLocked(f"{_describe(path, holder)}: another worker is training this run; skipped")
        if holder is not None and not warned:
            warnings.warn(f"{_describe(path, holder)}: waiting for it; if that worker is gone (a lock from another "
                          "host is never judged stale here), delete the file", stacklevel=3)
            warned = True
        time.sleep(poll)
    try:
        yield Lock(took_over)
    finally:
        if path.is_file() and path.read_text() == mine:  # never another worker's (after a manual delete)
            path.unlink()
