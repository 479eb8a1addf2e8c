"""Run one command and measure it as a user would feel it: whole-process wall time.

Wall time spans fork to exit, interpreter start-up included. Peak RSS is reported twice:
``maxrss_mb`` is the largest single process of the tree, from GNU ``/usr/bin/time`` (which
forks the tool from its own small process: ``ru_maxrss`` of a child forked straight from this
harness would start at the harness's own size), ``tree_rss_mb`` the largest sum of VmRSS over
the live process tree, sampled every 10-50 ms from /proc (what a multi-process tool holds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SAMPLE_EVERY_S = 0.05
GNU_TIME = "/usr/bin/time"


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    tree_rss_mb: float
    timed_out: bool
    stderr_tail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            kids.extend(int(k) for k in text.split())
    except OSError:
        pass
    return kids


def _rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _tree_pids(root: int) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(_children(pid))
    return found


class _TreeSampler(threading.Thread):
    """Peak of the summed RSS of ``pid``'s descendants (``pid`` itself is the time wrapper)."""

    def __init__(self, pid: int, include_root: bool) -> None:
        super().__init__(daemon=True)
        self.pid, self.include_root, self.peak_kb = pid, include_root, 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        pids: list[int] = []
        samples = 0
        # sample fast at first so short-lived commands (--help) are seen at all
        while not self.stop_event.wait(0.01 if time.monotonic() - start < 1 else SAMPLE_EVERY_S):
            # Walking every thread's children file is costly for a 256-thread tool: refresh
            # the process list every 10th sample only and read just statm in between.
            if samples % 10 == 0:
                roots = [self.pid] if self.include_root else _children(self.pid)
                pids = [p for r in roots for p in _tree_pids(r)]
            samples += 1
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(p) for p in pids))


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent in processes since boot (/proc/stat).

    irq and softirq are left out: loopback traffic is processed there and belongs to no process.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(f) for f in fields[:3])
    return (user + nice + system) / CLK_TCK


def own_cpu_s() -> float:
    """This harness's CPU (all its threads: the RSS sampler above all)."""
    t = os.times()
    return t.user + t.system


def tree_cpu_s(root: int) -> float:
    """utime+stime of root and its live descendants (e.g. the nginx master and workers)."""
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(_children(pid))
    return total


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


def run(
    cmd: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 900.0,
) -> Measurement:
    """Run ``cmd`` to completion (its own process group; killed whole on timeout)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    time_path = log_dir / "maxrss-kb.txt"
    time_path.unlink(missing_ok=True)
    wrapped = Path(GNU_TIME).exists()
    full_cmd = [GNU_TIME, "-q", "-f", "%M", "-o", str(time_path), *cmd] if wrapped else cmd
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            full_cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        sampler = _TreeSampler(proc.pid, include_root=not wrapped)
        sampler.start()
        timer = threading.Timer(timeout_s, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        sampler.stop_event.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    # leftovers of the tool's own group (daemonised helpers) would skew the next run
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    stderr_tail = _tail(err_path) or _tail(out_path)
    maxrss_kb = usage.ru_maxrss
    if wrapped:
        with contextlib.suppress(OSError, ValueError, IndexError):
            maxrss_kb = int(time_path.read_text().split()[-1])
    return Measurement(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=round(wall, 4),
        user_s=round(usage.ru_utime, 3),
        sys_s=round(usage.ru_stime, 3),
        maxrss_mb=round(maxrss_kb / 1024, 1),
        tree_rss_mb=round(max(sampler.peak_kb, maxrss_kb) / 1024, 1),
        timed_out=wall >= timeout_s,
        stderr_tail=stderr_tail,
    )
