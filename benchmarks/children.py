"""Child processes of the benchmark: each bounded by a timeout, reaped with its own resource usage (so its peak RSS is
its own, not the maximum over every child so far as RUSAGE_CHILDREN would give), and killed by pid on the way out.

Children run in their own session, so a Ctrl-C in the terminal reaches only the benchmark, which then stops them.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float  # from spawn to exit, as seen by the parent
    peak_rss_bytes: int  # the child's own ru_maxrss
    cpu_s: float  # user + system CPU time of the child (robust to other load, unlike wall time)
    stdout: str
    stderr: str
    timed_out: bool


def _spawn(argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: object, stderr: object) -> subprocess.Popen:
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=dict(env),
                            cwd=cwd, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    return proc


def _forget(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def _reap(proc: subprocess.Popen, guard: threading.Lock) -> tuple[int, int, float]:
    """Wait for the child to exit, then reap it: (exit code, peak RSS bytes, CPU seconds). The exit is observed
    without reaping first (WNOWAIT), so a timeout kill that holds `guard` can never hit a reused pid."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    with guard:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    _forget(proc)
    return proc.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux: ru_maxrss in KiB


def _watch(pid: int, monitor: Callable[[int], bool], interval: float, done: threading.Event) -> None:
    with contextlib.suppress(Exception):  # a monitor that fails (the child is gone, ...) just stops watching
        while not done.wait(interval):
            if monitor(pid):
                return


def run_child(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float,
              monitor: Callable[[int], bool] | None = None, interval: float = 0.05) -> ChildResult:
    """Run argv to completion (killed after `timeout` seconds); its output is spooled to temporary files. While it
    runs, monitor(pid) is called every `interval` seconds on another thread until it returns True."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        guard = threading.Lock()
        expired = threading.Event()
        start = time.perf_counter()
        proc = _spawn(argv, env, cwd, out, err)

        def expire() -> None:
            with guard:
                if proc.returncode is None:
                    expired.set()
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        done = threading.Event()
        watcher = None
        if monitor is not None:
            watcher = threading.Thread(target=_watch, args=(proc.pid, monitor, interval, done), daemon=True)
            watcher.start()
        try:
            code, rss, cpu = _reap(proc, guard)
        finally:
            timer.cancel()
            done.set()
            if watcher is not None:
                watcher.join(timeout=5)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildResult(code, wall, rss, cpu, out.read().decode("utf-8", "replace"),
                           err.read().decode("utf-8", "replace"), expired.is_set())


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the child's peak RSS in bytes (0 if already reaped)."""
    if proc.returncode is not None:
        _forget(proc)
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            _forget(proc)
            return usage.ru_maxrss * 1024
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _forget(proc)
    return usage.ru_maxrss * 1024


def stop_all() -> None:
    """Stop every child still running (Ctrl-C, errors): by pid, one at a time."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        with contextlib.suppress(ChildProcessError, OSError):
            stop(proc, grace=2.0)


@dataclass
class SandboxProcess:
    """`python -m shared sandbox` in a child process, on 127.0.0.1 with a free port."""

    proc: subprocess.Popen
    url: str
    list_id: str
    fields: dict[str, str]
    stderr_path: Path

    @classmethod
    def start(cls, *, env: Mapping[str, str], cwd: Path, list_id: str, fields: Sequence[str], job_delay: float,
              log_dir: Path, nodelay: bool = False, timeout: float = 30.0) -> SandboxProcess:
        command = ["benchmarks.nodelay_sandbox"] if nodelay else ["shared", "sandbox"]
        argv = [sys.executable, "-m", *command, "--host", "127.0.0.1", "--port", "0", "--list-id", list_id,
                "--job-delay", str(job_delay)]
        for f in fields:
            argv += ["--field", f]
        log_dir.mkdir(parents=True, exist_ok=True)
        stderr_path = log_dir / f"sandbox-{time.strftime('%H%M%S')}-{os.getpid()}.stderr"
        with open(stderr_path, "wb") as err:
            proc = _spawn(argv, env, cwd, subprocess.PIPE, err)
        try:
            lines = _read_lines(proc, 2 + len(fields), timeout)
        except BaseException:
            stop(proc)
            raise
        url = lines[0].strip()
        if not url.startswith("http://127.0.0.1:"):
            stop(proc)
            raise RuntimeError(f"the sandbox printed {url!r} instead of its URL; see {stderr_path}")
        fields_by_name: dict[str, str] = {}
        for line in lines[1:]:  # "list_id <id>", then "field <name> <id>" per field
            kind, _, rest = line.strip().partition(" ")
            if kind == "list_id":
                list_id = rest
            elif kind == "field":
                name, _, fid = rest.partition(" ")
                fields_by_name[name] = fid
        return cls(proc, url, list_id, fields_by_name, stderr_path)

    def stop(self) -> int:
        """Stop the sandbox; its peak RSS in bytes."""
        rss = stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rss


def _read_lines(proc: subprocess.Popen, count: int, timeout: float) -> list[str]:
    """The first `count` lines the child prints, or RuntimeError when it exits or stays silent."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the sandbox printed no URL within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the sandbox exited early (code {proc.poll()})")
            buf += chunk
    return buf.decode().splitlines()[:count]
