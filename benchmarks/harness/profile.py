"""py-spy profiles of one fetchpool run per workload, and a plain-text summary of hot spots.

Writes benchmarks/.work/profile-W?.svg (flame graph), profile-W?.txt (collapsed stacks) and
prints the top functions by self time and by total time.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from pathlib import Path

from harness.env import WORK_DIR, log


def _pyspy(peers_python: Path) -> Path | None:
    exe = peers_python.with_name("py-spy")
    return exe if exe.exists() else (Path(p) if (p := shutil.which("py-spy")) else None)


def record(cmd: list[str], key: str, peers_python: Path, out_dir: Path) -> Path | None:
    pyspy = _pyspy(peers_python)
    if pyspy is None:
        log("py-spy unavailable: no profile")
        return None
    raw = WORK_DIR / f"profile-{key}.txt"
    for fmt, dest in (("flamegraph", WORK_DIR / f"profile-{key}.svg"), ("raw", raw)):
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        for native in (["--native"], []):
            proc = subprocess.run(
                [
                    str(pyspy),
                    "record",
                    *native,
                    "--subprocesses",
                    "--rate",
                    "250",
                    "--format",
                    fmt,
                    "--output",
                    str(dest),
                    "--",
                    *cmd,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode == 0 and dest.exists():
                break
            log(f"py-spy {' '.join(native)} failed: {proc.stderr.strip()[-300:]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return raw if raw.exists() else None


def summarize(raw: Path, top: int = 15) -> str:
    """Top frames by self and total samples from py-spy's collapsed-stack output."""
    self_counts: collections.Counter[str] = collections.Counter()
    py_self: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    idle_markers = (
        "wait (threading.py",
        "_wait_for_tstate_lock",
        "acquire",
        "select (",
        "poll (",
        "epoll",
    )
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        self_counts[frames[-1]] += count
        # native frames (libc, libpython) charged to the Python line that called them
        py_frames = [f for f in frames if ".py:" in f or "<frozen" in f]
        native = "" if frames[-1] in py_frames[-1:] else f"  -> {frames[-1].split(' (')[0]}"
        py_self[(py_frames[-1] if py_frames else frames[-1]) + native] += count
        for frame in set(frames):
            total_counts[frame] += count
    lines = [f"{samples} samples (all threads; idle waits included)", "", "top self:"]
    for frame, count in self_counts.most_common(top):
        idle = " [idle]" if any(m in frame for m in idle_markers) else ""
        lines.append(f"  {100 * count / max(1, samples):5.1f}%  {frame}{idle}")
    lines += ["", "top self, by the innermost Python line (-> the native call it was in):"]
    for frame, count in py_self.most_common(top):
        lines.append(f"  {100 * count / max(1, samples):5.1f}%  {frame}")
    lines += ["", "top total (fetchpool frames):"]
    ours = [(f, c) for f, c in total_counts.most_common() if "fetchpool" in f]
    for frame, count in ours[:top]:
        lines.append(f"  {100 * count / max(1, samples):5.1f}%  {frame}")
    return "\n".join(lines)
