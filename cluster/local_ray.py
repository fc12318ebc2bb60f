"""The local Ray instance that `cryoves run` starts: owned by the driver and stopped with it, however it ends.

Ray's agents outlive a driver killed by SIGKILL: they are left to init, hold about 90 MB each and ignore
SIGTERM. So a watchdog process, in a session of its own (Ctrl-C in the terminal does not reach it),
notes every process started under the driver while it runs, and when the driver ends (normally or not:
either closes the pipe that only the driver holds) stops those still running. Processes are read from
/proc (Linux); elsewhere only Ray's own shutdown runs.
"""

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

STOP_GRACE_S = 2.0
"""How long the watchdog lets the instance's processes end on SIGTERM before it kills them."""
POLL_S = 0.25
"""How often the watchdog notes the driver's descendants."""


@contextmanager
def local_ray(num_cpus: int):
    """A local Ray instance for the block, stopped when the block ends or this process dies."""
    import ray

    watchdog = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        watchdog.stdin.close()  # the watchdog stops what shutdown left
        watchdog.wait()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int, since: int = 0) -> dict[int, str]:
    """The live processes under `root` (children, theirs, ...) started at or after `since` (clock ticks
    after boot, as /proc gives start times): pid → start time, which tells a pid reused by a later
    process apart."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else ():
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = fields[19]
    found, todo = {}, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if int(started[pid]) >= since:
            found[pid] = started[pid]
        todo += children.get(pid, ())
    return found


def running(processes: dict[int, str]) -> list[int]:
    """The pids of `processes` (pid → start time) that still run (not ended, not zombies, not reused)."""
    alive = []
    for pid, start in processes.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == start:
            alive.append(pid)
    return alive


def stop(processes: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL for what still runs after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running(processes):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + STOP_GRACE_S
        while running(processes) and time.monotonic() < deadline:
            time.sleep(POLL_S / 5)
        if not running(processes):
            return


def _watch(driver_pid: int) -> None:
    """The watchdog: note the driver's descendants until its end (end of file on stdin), then stop them."""
    own = _stat(os.getpid())
    since = int(own[19]) if own else 0  # what the driver started before the instance is not the instance's
    seen: dict[int, str] = {}
    while True:
        seen |= descendants(driver_pid, since)
        readable, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1 << 12):
            break
    seen.pop(os.getpid(), None)
    stop(seen)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
