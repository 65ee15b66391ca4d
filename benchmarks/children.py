"""Child processes of the benchmark: each bounded by a timeout, reaped with its own resource usage (so its peak RSS is
its own, not the maximum over every child so far as RUSAGE_CHILDREN would give), and killed by pid on the way out.

Children run in their own session, so a Ctrl-C in the terminal reaches only the benchmark, which then stops them.

A measured child may start processes of its own (worker pools: multiprocessing's "spawn" or "forkserver" context, the
forkserver itself, its resource tracker). run_child accounts for the whole tree:

- memory: every TREE_INTERVAL_S it sums the RSS of the child and of all its descendants (psutil); the peak of that sum
  is the child's `tree_peak_rss_bytes`;
- CPU: on Linux, wait4 reports the child's own CPU plus that of every descendant reaped by its parent before that
  parent was itself reaped (a pool's joined "spawn" workers, grandchildren run with subprocess.run). Descendants the
  child leaves behind are reparented to init and their CPU is lost to wait4: a forkserver and the workers it forked
  and reaped, the resource tracker. So the benchmark makes itself their reaper (PR_SET_CHILD_SUBREAPER): orphans of
  the measured tree are reparented to it, and it reaps them with wait4 after the child exits and adds their CPU.

`python -m benchmarks.tree_check` shows both on small pools.

A child's wait4 peak RSS is at least the benchmark's own RSS when it started the child: Linux carries the high-water
mark of the memory a process had before exec into the new program's (exec_mmap), and subprocess forks (or vforks)
this process first. So keep the benchmark process small between children (generate and change exports in a child or
by streaming); a peak far above `tree_sampled_peak_rss_bytes` says it was not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()
STOP_GRACE_S = 5.0
TREE_INTERVAL_S = 0.2  # RSS of the process tree: one sample costs ~3 ms of CPU (a scan of /proc)
ORPHAN_GRACE_S = 5.0  # how long descendants left behind by an exited child may take to exit before they are stopped
_PR_SET_CHILD_SUBREAPER = 36
_subreaper: bool | None = None


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float  # from spawn to exit, as seen by the parent
    peak_rss_bytes: int  # wait4's ru_maxrss: the child's own peak, or that of a descendant it reaped if higher
    cpu_s: float  # user + system CPU time of the child and all its descendants (reaped_cpu_s + orphan_cpu_s)
    stdout: str
    stderr: str
    timed_out: bool
    tree_peak_rss_bytes: int = 0  # peak of the sampled RSS sum over the child and its descendants (>= peak_rss_bytes)
    tree_sampled_peak_rss_bytes: int = 0  # the highest sample alone
    tree_peak_at_s: float | None = None  # seconds after spawn of the highest sample
    tree_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s after spawn, RSS sum, processes)
    max_processes: int = 1  # the most processes in the tree at one sample
    processes_seen: int = 1  # distinct processes in the tree over all samples (the child included)
    reaped_cpu_s: float = 0.0  # wait4's CPU: the child and every descendant reaped within the tree
    orphan_cpu_s: float = 0.0  # CPU of the descendants left behind, reaped by the benchmark as their subreaper
    orphans: int = 0  # how many descendants were left behind
    orphans_stopped: int = 0  # of them, still running ORPHAN_GRACE_S after the child exited: stopped by pid
    orphans_exit_after_s: float | None = None  # when the last orphan exited, seconds after the child exited
    subreaper: bool = False  # False: orphans could not be collected, orphan_cpu_s is missing from cpu_s


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl), once; False where unavailable."""
    global _subreaper
    if _subreaper is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper = False
    return _subreaper


def _spawn(argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: object, stderr: object) -> subprocess.Popen:
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=dict(env),
                            cwd=cwd, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    return proc


def _forget(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def _orphan_pids() -> list[int]:
    """Children of this process it did not start with _spawn: descendants of a child, orphaned and reparented here
    (subreaper). Nothing else in the benchmark process starts children while a measured child runs."""
    import psutil

    with _LIVE_LOCK:
        live = set(_LIVE)
    try:
        return [c.pid for c in psutil.Process().children() if c.pid not in live]
    except psutil.Error:
        return []


@dataclass
class Orphans:
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0  # the highest ru_maxrss among them
    count: int = 0
    stopped: int = 0
    exit_after_s: float | None = None


def reap_orphans(grace: float = ORPHAN_GRACE_S) -> Orphans:
    """Reap the orphans reparented to this process (those of an exited child), waiting up to `grace` seconds for them
    to exit, then stopping the rest by pid (SIGTERM, SIGKILL a second later). They are this process's unreaped
    children, so their pids cannot have been reused. Their wait4 CPU includes the descendants they reaped."""
    out = Orphans()
    start = time.monotonic()
    signalled: dict[int, float] = {}
    while True:
        pids = _orphan_pids()
        now = time.monotonic()
        if not pids or now - start > grace + 30:  # + 30: one that survives SIGKILL (stuck in the kernel) is left
            break
        for pid in pids:
            try:
                got, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                out.count += 1
                out.cpu_s += usage.ru_utime + usage.ru_stime
                out.peak_rss_bytes = max(out.peak_rss_bytes, usage.ru_maxrss * 1024)
                out.exit_after_s = now - start
            elif now - start > grace:
                sig = signal.SIGTERM if pid not in signalled else signal.SIGKILL
                if pid not in signalled or (sig == signal.SIGKILL and now - signalled[pid] > 1.0):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    if pid not in signalled:
                        out.stopped += 1
                    signalled[pid] = now
        time.sleep(0.01)
    return out


class ProcessTree:
    """Samples the RSS of a child and all its descendants every `interval` seconds on a thread of its own: the child,
    its descendants, and the orphans reparented to this process (descendants the child left behind), but not the
    subtrees of other children (the sandbox)."""

    def __init__(self, pid: int, interval: float = TREE_INTERVAL_S) -> None:
        import psutil

        self.pid = pid
        self.interval = interval
        self.start = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, RSS sum bytes, processes)
        self.peak_rss_bytes = 0
        self.peak_at_s: float | None = None
        self.max_processes = 0
        self.seen: set[tuple[int, float]] = set()  # (pid, create time)
        self._me = psutil.Process()
        self._members: list[Any] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tree-{pid}", daemon=True)

    def begin(self) -> ProcessTree:
        self._thread.start()
        return self

    def end(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self) -> list[Any]:
        """Take a sample now (from any thread); its processes."""
        self.sample()
        return self._members

    def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failed sample is skipped
                self.sample()
            if self._done.wait(self.interval):
                return

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        import psutil

        with _LIVE_LOCK:
            others = set(_LIVE) - {self.pid}
        parents: dict[int, int] = {}
        procs: dict[int, Any] = {}
        for p in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                parents[p.pid] = p.ppid()
                procs[p.pid] = p
        me, tops = self._me.pid, {}

        def top(pid: int) -> int:  # the child of this process whose subtree holds pid
            path = []
            while pid in parents and parents[pid] != me and pid not in tops:
                path.append(pid)
                pid = parents[pid]
            found = tops.get(pid, pid)
            for q in path:
                tops[q] = found
            return found

        members = [p for pid, p in procs.items() if top(pid) not in others and top(pid) in parents]
        members.sort(key=lambda p: p.pid != self.pid)
        total = 0
        for p in members:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
                self.seen.add((p.pid, p.create_time()))
        now = round(time.monotonic() - self.start, 2)
        self._members = members
        self.samples.append((now, total, len(members)))
        self.max_processes = max(self.max_processes, len(members))
        if total > self.peak_rss_bytes:
            self.peak_rss_bytes, self.peak_at_s = total, now


def _watch(tree: ProcessTree, monitor: Callable[[ProcessTree], bool], interval: float, done: threading.Event) -> None:
    with contextlib.suppress(Exception):  # a monitor that fails (the child is gone, ...) just stops watching
        while not done.wait(interval):
            if monitor(tree):
                return


def run_child(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float,
              monitor: Callable[[ProcessTree], bool] | None = None, interval: float = 0.05,
              tree_interval: float = TREE_INTERVAL_S) -> ChildResult:
    """Run argv to completion (killed after `timeout` seconds); its output is spooled to temporary files. While it
    runs, its process tree is sampled every `tree_interval` seconds, and monitor(tree) is called every `interval`
    seconds on another thread until it returns True. One measured child at a time (orphans are attributed to it)."""
    subreaper = become_subreaper()
    if subreaper:
        reap_orphans(grace=0.0)  # leftovers of an earlier child, if any, are not this one's
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        guard = threading.Lock()
        expired = threading.Event()
        start = time.perf_counter()
        proc = _spawn(argv, env, cwd, out, err)
        tree = ProcessTree(proc.pid, tree_interval).begin()

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
            watcher = threading.Thread(target=_watch, args=(tree, monitor, interval, done), daemon=True)
            watcher.start()
        try:
            # The exit is observed without reaping first (WNOWAIT), so a timeout kill that holds `guard` can never
            # hit a reused pid.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - start
            tree.end()
            with guard:
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            _forget(proc)
            orphans = reap_orphans() if subreaper else Orphans()
        finally:
            timer.cancel()
            done.set()
            tree.end()
            if watcher is not None:
                watcher.join(timeout=5)
        rss = usage.ru_maxrss * 1024  # Linux: ru_maxrss in KiB
        reaped_cpu = usage.ru_utime + usage.ru_stime
        out.seek(0)
        err.seek(0)
        return ChildResult(
            proc.returncode, wall, rss, reaped_cpu + orphans.cpu_s, out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"), expired.is_set(),
            # every single process's peak is a lower bound of the peak of the sum, as is every sample of the sum
            tree_peak_rss_bytes=max(tree.peak_rss_bytes, rss, orphans.peak_rss_bytes),
            tree_sampled_peak_rss_bytes=tree.peak_rss_bytes, tree_peak_at_s=tree.peak_at_s,
            tree_samples=tree.samples, max_processes=max(tree.max_processes, 1),
            processes_seen=max(len(tree.seen), 1), reaped_cpu_s=reaped_cpu, orphan_cpu_s=orphans.cpu_s,
            orphans=orphans.count, orphans_stopped=orphans.stopped, orphans_exit_after_s=orphans.exit_after_s,
            subreaper=subreaper)


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
    """Stop every child still running (Ctrl-C, errors): by pid, one at a time; then the descendants they left behind
    (reparented to this process)."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        with contextlib.suppress(ChildProcessError, OSError):
            stop(proc, grace=2.0)
    if _subreaper:
        with contextlib.suppress(OSError):
            reap_orphans(grace=2.0)


@dataclass
class SandboxProcess:
    """`python -m shared sandbox` in a child process, on 127.0.0.1 with a free port."""

    proc: subprocess.Popen
    url: str
    list_id: str
    fields: dict[str, str]
    stderr_path: Path
    argv: list[str]

    @classmethod
    def start(cls, *, env: Mapping[str, str], cwd: Path, list_id: str, fields: Sequence[str], job_delay: float,
              log_dir: Path, nodelay: bool = False, latency: float = 0.0, bandwidth_mbit: float | None = None,
              timeout: float = 30.0) -> SandboxProcess:
        """`latency` > 0: passed as `--latency SECONDS` (the sandbox waits that long before every answer);
        `bandwidth_mbit`: as `--bandwidth-mbit N` (request bodies are read no faster)."""
        command = ["benchmarks.nodelay_sandbox"] if nodelay else ["shared", "sandbox"]
        argv = [sys.executable, "-m", *command, "--host", "127.0.0.1", "--port", "0", "--list-id", list_id,
                "--job-delay", str(job_delay)]
        if latency > 0:
            argv += ["--latency", f"{latency:g}"]
        if bandwidth_mbit:
            argv += ["--bandwidth-mbit", f"{bandwidth_mbit:g}"]
        for f in fields:
            argv += ["--field", f]
        log_dir.mkdir(parents=True, exist_ok=True)
        stderr_path = log_dir / f"sandbox-{time.strftime('%H%M%S')}-{os.getpid()}.stderr"
        with open(stderr_path, "wb") as err:
            proc = _spawn(argv, env, cwd, subprocess.PIPE, err)
        try:
            lines = _read_lines(proc, 2 + len(fields), timeout)
        except RuntimeError as exc:
            stop(proc)
            tail = stderr_path.read_text(errors="replace").strip()[-1500:]
            raise RuntimeError(f"{exc}: python {' '.join(argv[1:])}" + (f"\n{tail}" if tail else "")) from None
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
        return cls(proc, url, list_id, fields_by_name, stderr_path, argv)

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
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                raise RuntimeError(f"the sandbox exited early (code {proc.returncode})")
            buf += chunk
    return buf.decode().splitlines()[:count]
