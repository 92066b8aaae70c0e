"""One training run per run dir at a time: `<run dir>/run.lock`, taken at start, released at exit.

The lock file is created atomically (O_CREAT | O_EXCL) and records the holder's host, PID, the PID's
start time (Linux `/proc`, so a reused PID is not mistaken for the holder) and SLURM job and restart
count. A second run started into the run dir while the holder lives is refused with one line. A lock
left behind by a holder that can no longer exit cleanly (`kill -9`, a node crash) is stale and taken over:

* same host: the holder's PID no longer runs (or runs a process that started at another time);
* same SLURM job, other restart count: SLURM ended the earlier run of this job before requeueing it;
* another host: nothing can be asked of its PID there, so the holder touches the lock every
  `heartbeat_s` (a daemon thread); a lock untouched for `stale_after_s` is stale, a fresher one
  refuses (remove the file by hand if that run is known to be gone).

Only the launching process (global rank 0: the process Lightning's `ddp` launcher runs in, or rank 0
under torchrun / SLURM) takes the lock; the ranks it starts run inside its lifetime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockError(RuntimeError):
    """The run dir is in use by a live run."""


def process_start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name in parentheses


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": process_start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }


class RunLock:
    """Context manager holding `<run_dir>/run.lock` (see the module doc); a no-op when `enabled` is false."""

    def __init__(self, run_dir, heartbeat_s: float, stale_after_s: float, enabled: bool = True):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s, self.enabled = heartbeat_s, stale_after_s, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict | None = None

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_reason(self, held: dict, age_s: float) -> str | None:
        """Why the lock `held` (last touched `age_s` ago) is stale, or None while its holder may live."""
        me = holder_record()
        same_job = held.get("slurm_job_id") and held["slurm_job_id"] == me["slurm_job_id"]
        if same_job and held.get("slurm_restart_count") != me["slurm_restart_count"]:
            return f"an earlier run of SLURM job {held['slurm_job_id']}"
        if held.get("host") == me["host"]:
            pid = int(held.get("pid", -1))
            if pid == os.getpid():
                return None  # this very process: a run inside a run into the same dir
            if not pid_alive(pid):
                return f"PID {pid} no longer runs"
            started = held.get("pid_start")
            if started is not None and process_start_time(pid) not in (None, started):
                return f"PID {pid} now belongs to another process"
            return None
        if age_s > self.stale_after_s:
            return f"untouched for {age_s:.0f} s (> {self.stale_after_s:.0f} s) by host {held.get('host')}"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = holder_record()
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            break
        self._record = record
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text()
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            held = json.loads(text)
            if not isinstance(held, dict):
                raise ValueError
        except ValueError:
            if age_s < 1.0:
                time.sleep(0.1)  # its writer is between creating the file and writing it
                return
            held = {}
        reason = self.stale_reason(held, age_s) if held else "unreadable"
        if reason is None:
            raise RunLockError(
                f"run dir {self.path.parent} is in use by a live run (host {held.get('host')}, PID "
                f"{held.get('pid')}; lock {self.path}). Wait for it to end, or start this run in its own "
                "folder (hydra.run.dir=<new folder>); if that run is known to be gone, delete the lock file."
            )
        # rename, then unlink: of two processes taking over at once only one rename succeeds; one that
        # renamed a lock written meanwhile by the other puts it back
        claimed = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, claimed)
        except FileNotFoundError:
            return
        if claimed.read_text() != text:
            with contextlib.suppress(FileExistsError):
                os.link(claimed, self.path)
            claimed.unlink(missing_ok=True)
            return
        claimed.unlink(missing_ok=True)
        log.warning("Took over the stale lock %s (%s).", self.path, reason)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._record is None:
            return
        self._stop.set()
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = None
        if held == self._record:  # never remove a lock another run has taken over
            self.path.unlink(missing_ok=True)
        self._record = None
