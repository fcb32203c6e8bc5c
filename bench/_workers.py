"""``worker.py`` processes for the benchmark: start one, follow its log, stop it and read its peak memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.areas import REPO


class Worker:
    """``worker.py N`` as a child process (through bench/_worker.py for millisecond log times)."""

    _LINE = re.compile(r"^@(\d+\.\d+) \S+\s+\S+: (.*)$")

    def __init__(self, n: int, args: list[str], env: dict[str, str] | None = None):
        self.n = n
        self.lines: list[tuple[float, str]] = []
        self.raw: list[str] = []
        self.spawned = time.time()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "_worker.py"), str(REPO / "worker.py"),
                                      str(n), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env={**os.environ, **(env or {})})
        self.maxrss_kib: int | None = None
        self.cpu_s: float | None = None
        self.returncode: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            match = self._LINE.match(line.rstrip("\n"))
            if match:
                self.lines.append((float(match.group(1)), match.group(2)))

    def assignment(self) -> set[int] | None:
        """Partitions currently held, from the log (None: never assigned)."""
        state: set[int] | None = None
        for _, text in list(self.lines):
            if text.startswith("partitions assigned:"):
                state = set(json.loads(text.split(":", 1)[1].strip()))
            elif text.startswith("partitions revoked:"):
                state = set()
        return state

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the worker finishes, leaves the group and exits), then reap it with wait4 for its peak RSS
        and CPU time (SIGKILL after ``timeout``)."""
        if self.returncode is not None:
            return
        if self.proc.returncode is None:  # not reaped yet (Popen.poll reaps a child that died early)
            try:
                os.kill(self.proc.pid, signal.SIGTERM)  # not Popen.send_signal: its poll() could reap the child
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            try:
                while True:
                    pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() > deadline:
                        os.kill(self.proc.pid, signal.SIGKILL)
                        pid, status, usage = os.wait4(self.proc.pid, 0)
                        break
                    time.sleep(0.05)
                self.maxrss_kib = usage.ru_maxrss
                self.cpu_s = usage.ru_utime + usage.ru_stime
                self.proc.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere
                pass
        self.returncode = self.proc.returncode
        self._reader.join(timeout=5)

    @property
    def log(self) -> str:
        return "".join(self.raw)

    _STARTED = re.compile(r"task (\S+) \(cell .*\) started")
    _ENDED = re.compile(r"task (\S+) (?:ok|no_scenes|no_fields|failed): \d+ chips in")

    def task_times(self) -> tuple[dict[str, float], dict[str, float]]:
        """From the log: task id -> when this worker started it, and -> when it logged the task's end
        (each the first time; the starts in the order they came)."""
        started: dict[str, float] = {}
        ended: dict[str, float] = {}
        for ts, text in list(self.lines):
            m = self._STARTED.match(text)
            if m:
                started.setdefault(m.group(1), ts)
            m = self._ENDED.match(text)
            if m:
                ended.setdefault(m.group(1), ts)
        return started, ended


def proc_stat(pid: int) -> tuple[float, float, int] | None:
    """CPU seconds (user + system), of them the system's, and minor page faults of a live process so
    far, from one read of /proc; None for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick, int(fields[7])
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """CPU seconds (user + system) of each worker process, sampled every ``interval_s`` in a thread, so that
    the CPU a worker had used at any moment of the run (the end of its first task) can be read back."""

    def __init__(self, workers: list[Worker], interval_s: float = 0.02):
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[float, float]]] = {w.n: [] for w in workers}
        self._pids = {w.n: w.proc.pid for w in workers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        """End the sampling with one last sample (again: nothing more)."""
        if self._stop.is_set() or not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        for n, pid in self._pids.items():
            stat = proc_stat(pid)
            if stat is not None:
                self.samples[n].append((time.time(), stat[0]))

    def cpu_at(self, n: int, when: float) -> float | None:
        """Worker ``n``'s CPU seconds at epoch time ``when`` (linear between the samples around it; None
        outside the sampled span)."""
        samples = self.samples.get(n) or []
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if t0 <= when <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)
        return None


def wait_ready(workers: list[Worker], partitions: int, timeout: float = 120.0) -> float:
    """Wait until the group is settled: every worker holds partitions, together all of them, once each."""
    start = time.monotonic()
    while True:
        states = [w.assignment() for w in workers]
        if all(s for s in states):
            union: set[int] = set()
            total = 0
            for s in states:
                union |= s  # type: ignore[operator]
                total += len(s)  # type: ignore[arg-type]
            if total == partitions and len(union) == partitions:
                return time.monotonic() - start
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.n} exited early:\n{w.log[-3000:]}")
        if time.monotonic() - start > timeout:
            raise RuntimeError("workers did not settle into the group:\n" + "\n".join(w.log[-1500:] for w in workers))
        time.sleep(0.05)
