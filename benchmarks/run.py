"""The performance benchmark: the real engine (the CLI in a child process) against the local sandbox (another child
process, loopback), next to two baselines measured in the same run. See benchmarks/README.md for every figure.

    python -m benchmarks.run [--sizes 100000,1000000,5000000 | --quick] [--seed 7] [--no-naive]
                             [--latency [SECONDS] [--bandwidth-mbit N]] [--workers N] [--imports]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sandbox import samplegen
from shared import limits

from . import children, latency
from . import imports as door_imports
from .exports import Export, ensure_export, warm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (100_000, 1_000_000)
QUICK_SIZES = (20_000, 100_000)
DESTINATION = "vip-newsletter"
FIELDS = ("lifetime_value:Number", "signup_date:Date")
JOB_DELAY_S = 0.1
WATCH_INTERVAL_S = 0.05
PUT_CONTACTS = "PUT /v3/marketing/contacts"
MB = 1_000_000

# Targets from the issue: (key, text). Evaluated in evaluate_targets; PASS / MISS / n/a, never asserted.
TARGET_ENGINE_VS_FLOOR = 1.5
TARGET_NAIVE_VS_ENGINE = 20.0
TARGET_RSS_5M_BYTES = 200 * MB
TARGET_GROWTH_BYTES = 16.0


# ------------------------------------------------------------------------------------------------------- helpers


def parse_sizes(text: str) -> list[int]:
    """'100000,1M,250k' -> [100000, 1000000, 250000]."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1], 1)
        number = float(part[:-1]) if scale != 1 else float(part)
        size = int(number * scale)
        if size < 1:
            raise argparse.ArgumentTypeError(f"size must be at least 1: {part!r}")
        sizes.append(size)
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sorted(set(sizes))


def label(n: int) -> str:
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def minimum_requests(total_bytes: int, contacts: int, request_bytes: int = limits.MAX_REQUEST_BYTES) -> int:
    """The fewest PUTs SendGrid's limits allow for this many contacts and body bytes (bodies of at most
    request_bytes)."""
    if contacts <= 0:
        return 0
    return max(math.ceil(total_bytes / request_bytes), math.ceil(contacts / limits.MAX_CONTACTS_PER_REQUEST))


def growth_per_profile(small: tuple[int, int], big: tuple[int, int]) -> float | None:
    """Bytes of peak RSS per additional profile between two (profiles, peak RSS bytes) points."""
    (n_small, rss_small), (n_big, rss_big) = small, big
    if n_big <= n_small:
        return None
    return (rss_big - rss_small) / (n_big - n_small)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def engine_version(root: Path) -> dict[str, Any]:
    """The commit the engine was run from and the shared/ files changed since (read-only git calls)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "shared").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "uncommitted_shared_files": changed}


def child_env(api_key: str, url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEY_VAULT_URL", "SENDGRID_API_URL")}
    env["SENDGRID_API_KEY"] = api_key
    env["PYTHONPATH"] = str(REPO)
    if url:
        env["SENDGRID_API_URL"] = url
    return env


def timeout_for(base: float, per_million: float, n: int, scale: float, latency: float = 0.0,
                requests_per_million: float = 0.0) -> float:
    """Seconds a child may take: base + per_million per million rows, plus the sandbox's latency for every request
    it is expected to make (at most requests_per_million per million rows, and 50 more), all times scale."""
    return (base + per_million * n / 1e6 + latency * (50 + requests_per_million * n / 1e6)) * scale


def tree_figures(result: children.ChildResult) -> dict[str, Any]:
    """Time, CPU and memory of a child and its process tree (children.run_child), as stored in the results."""
    return {
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,  # the whole tree: cpu_wait4_s + cpu_orphans_s
        "cpu_wait4_s": result.reaped_cpu_s,  # the process and every descendant reaped within the tree
        "cpu_orphans_s": result.orphan_cpu_s,  # descendants it left behind, reaped by the benchmark
        "peak_rss_bytes": result.peak_rss_bytes,  # the process's ru_maxrss (wait4)
        "tree_peak_rss_bytes": result.tree_peak_rss_bytes,  # peak of the RSS sum over the process tree
        "tree_sampled_peak_rss_bytes": result.tree_sampled_peak_rss_bytes,
        "tree_peak_at_s": result.tree_peak_at_s,
        "max_processes": result.max_processes,
        "processes_seen": result.processes_seen,
        "orphans": result.orphans,
        "orphans_stopped": result.orphans_stopped,
        "orphans_exit_after_s": result.orphans_exit_after_s,
    }


def _get_json(url: str, api_key: str | None = None, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def round_trip_s(sandbox_url: str, api_key: str, list_id: str, samples: int = 7, latency: float = 0.0) -> float:
    """Median time of a small keep-alive GET to the sandbox: its per-request floor (shows the Nagle stall and, with
    --latency, includes it)."""
    host, port = urlsplit(sandbox_url).hostname, urlsplit(sandbox_url).port
    conn = http.client.HTTPConnection(host, port, timeout=10 + latency)
    times = []
    try:
        for _ in range(samples):
            start = time.perf_counter()
            conn.request("GET", f"/v3/marketing/lists/{list_id}",
                         headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})
            conn.getresponse().read()
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    return statistics.median(times[1:])


def sandbox_cpu_s(sandbox: children.SandboxProcess) -> float:
    """CPU seconds the sandbox process has used so far (it shares the machine's cores with the engine)."""
    import psutil

    times = psutil.Process(sandbox.proc.pid).cpu_times()
    return times.user + times.system


def list_count(sandbox_url: str, api_key: str, list_id: str, latency: float = 0.0) -> int:
    url = f"{sandbox_url}/v3/marketing/lists/{list_id}/contacts/count"
    return int(_get_json(url, api_key, timeout=30 + latency)["contact_count"])


# -------------------------------------------------------------------------------------- first request vs reading


class EngineWatch:
    """Watches the export process and its descendants (worker processes) while they run (called every
    WATCH_INTERVAL_S by children.run_child with the process tree):

    - until the sandbox has received the first PUT /v3/marketing/contacts, how far the tree has read the export's
      partitions: the file offsets of the partition files its processes hold open (psutil), every partition before
      the last open one and every one seen open earlier counted as fully read. The first sample after the PUT
      arrived is an upper bound of what had been read when the request left: a fraction below 1 proves it left
      before the export was fully read;
    - every PUTS_EVERY_S the sandbox's PUT count (so the report can say when the last request arrived: what follows
      is polling the jobs and writing the list's snapshot). The process tree's RSS is sampled by run_child."""

    PUTS_EVERY_S = 0.5

    def __init__(self, sandbox_url: str, partitions: Sequence[Path], latency: float = 0.0,
                 give_up_s: float = 5.0) -> None:
        self.stats_url = f"{sandbox_url}/_sandbox/stats"
        self.stats_timeout = 5.0 + latency  # the sandbox's --latency delays its control answers too
        self.index = {str(p.resolve()): i for i, p in enumerate(partitions)}
        self.sizes = [p.stat().st_size for p in partitions]
        self.total = sum(self.sizes)
        self.give_up_s = give_up_s
        self.fraction: float | None = None
        self.opened: set[int] = set()  # partitions seen open so far
        self.puts = 0  # PUT /v3/marketing/contacts the sandbox had counted at the last count
        self.last_put_at: float | None = None  # first count (s since start) that saw the final count
        self._read_done = False
        self._seen_put_at: float | None = None
        self._start = time.monotonic()
        self._next_puts = 0.0

    def _read_bytes(self, procs: Sequence[Any]) -> int | None:
        """Upper bound of the partition bytes read so far, or None when no process holds a partition open."""
        import psutil

        open_at: dict[int, int] = {}
        for proc in procs:
            try:
                files = proc.open_files()
            except psutil.Error:
                continue
            for f in files:
                i = self.index.get(f.path)
                if i is not None:
                    open_at[i] = max(open_at.get(i, 0), min(f.position, self.sizes[i]))
        self.opened |= open_at.keys()
        if not open_at:
            return None
        last = max(open_at)
        return sum(open_at.get(i, size if i < last or i in self.opened else 0) for i, size in enumerate(self.sizes))

    def _watch_reading(self, tree: children.ProcessTree) -> None:
        now = time.monotonic()
        position = self._read_bytes(tree.refresh())  # a fresh scan: a worker may have started since the last sample
        if self._seen_put_at is None:
            if _get_json(self.stats_url, timeout=self.stats_timeout)["requests"].get(PUT_CONTACTS, 0) == 0:
                return
            self._seen_put_at = now
            position = self._read_bytes(tree.refresh())  # after the PUT was seen: an upper bound
        if position is not None:
            self.fraction = position / self.total if self.total else None
            self._read_done = True
        elif now - self._seen_put_at > self.give_up_s:  # between files, or done reading: unknown
            self._read_done = True

    def __call__(self, tree: children.ProcessTree) -> bool:
        if not self._read_done:
            self._watch_reading(tree)
        now = time.monotonic() - self._start
        if now >= self._next_puts:
            self._next_puts = now + self.PUTS_EVERY_S
            puts = _get_json(self.stats_url, timeout=self.stats_timeout)["requests"].get(PUT_CONTACTS, 0)
            if puts != self.puts:
                self.puts, self.last_put_at = puts, round(now, 2)
        return False


# ------------------------------------------------------------------------------------------------------ the runs


def _child_json(result: children.ChildResult, what: str) -> dict[str, Any]:
    if result.timed_out:
        raise RuntimeError(f"{what} timed out after {result.wall_s:.0f} s")
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _baseline(kind: str, export: Export, env: dict[str, str], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one baseline (benchmarks/baselines.py) in a child: (its tree figures, the JSON line it printed)."""
    result = children.run_child([sys.executable, "-m", "benchmarks.baselines", kind, str(export.model_json)],
                                env=env, cwd=REPO, timeout=timeout)
    return tree_figures(result), _child_json(result, f"{kind} baseline")


def run_floor(export: Export, scale: float) -> dict[str, Any]:
    figures, out = _baseline("floor", export, child_env("unused"), timeout_for(30, 120, export.rows, scale))
    return {**figures, "seconds": out["seconds"], "rows": out["rows"],
            "encoded_bytes": out["encoded_bytes"]}


def start_sandbox(engine_root: Path, log_dir: Path, **options: Any) -> tuple[str, children.SandboxProcess]:
    """A sandbox child with the benchmark's list and fields, and the random API key made for it (never printed)."""
    api_key = "SG.bench." + secrets.token_urlsafe(24)
    return api_key, children.SandboxProcess.start(env=child_env(api_key), cwd=engine_root, list_id=str(uuid.uuid4()),
                                                  fields=FIELDS, job_delay=JOB_DELAY_S, log_dir=log_dir, **options)


def export_args(config: Path, model_json: Path, state: Path, report: Path) -> list[str]:
    """The engine's command line after `python -m shared`: the benchmark destination, to the end, quietly."""
    return ["export", "--config", str(config), "--destination", DESTINATION, "--source", str(model_json),
            "--state-dir", str(state), "--wait", "--quiet", "--report", str(report)]


def engine_config(list_id: str, bulk_threshold: int | None, mode: str = "upsert",
                  max_in_flight: int | None = None) -> dict[str, Any]:
    """The benchmark's destinations file: the demo destination without a profile limit (so the first request leaves
    while the export is read) and, by default, without the bulk CSV path (so every contact goes as JSON requests);
    max_in_flight only when given (engines before issue 16's second decision refuse the field)."""
    config = samplegen.demo_destinations(list_id, max_profiles=None, mode=mode)
    config["destinations"][0]["bulk_threshold"] = bulk_threshold
    if max_in_flight is not None:
        config["destinations"][0]["max_in_flight"] = max_in_flight
    return config


def link_s(export: Export, bandwidth_mbit: float | None) -> float:
    """Seconds of a child's timeout for the bandwidth cap: twice the export's bytes at the bandwidth."""
    return 2 * export.bytes * 8 / (bandwidth_mbit * 1e6) if bandwidth_mbit else 0.0


def run_engine(export: Export, sandbox: children.SandboxProcess, api_key: str, work: Path,
               args: argparse.Namespace, max_in_flight: int | None = None) -> dict[str, Any]:
    suffix = f"{export.profiles}" + (f"-in-flight-{max_in_flight}" if max_in_flight is not None else "")
    config = work / f"destinations-{suffix}.json"
    config.write_text(json.dumps(engine_config(sandbox.list_id, args.bulk_threshold, args.mode, max_in_flight),
                                 indent=2))
    report_path = work / f"engine-report-{suffix}.json"
    state = work / f"state-{export.profiles}"
    argv = [sys.executable, "-m", "shared", *export_args(config, export.model_json, state, report_path)]
    watch = EngineWatch(sandbox.url, export.partitions, args.latency)
    timeout = (timeout_for(60, 300, export.rows, args.timeout_scale, args.latency, 500)
               + link_s(export, args.bandwidth_mbit) * args.timeout_scale)
    env = child_env(api_key, sandbox.url)
    if args.workers is not None:
        env["EXPORT_WORKERS"] = str(args.workers)
    result = children.run_child(argv, env=env, cwd=args.engine_root, monitor=watch, interval=WATCH_INTERVAL_S,
                                timeout=timeout)
    if args.mode != "mirror":  # mirror: the next repetition diffs this run's snapshot (measure_size removes it)
        shutil.rmtree(state, ignore_errors=True)  # run record and rejections CSV: not needed after the run
    if result.timed_out:
        raise RuntimeError(f"the engine timed out after {result.wall_s:.0f} s")
    if not report_path.is_file():
        raise RuntimeError(f"the engine exited with {result.returncode} without a report: {result.stderr[-2000:]}")
    report = json.loads(report_path.read_text())
    req, counts = report["requests"], report["counts"]
    sent = counts["sent"]
    imports = int(req.get("imports") or 0)
    import_contacts = sum(j.get("contacts", 0) for j in report["jobs"] if j.get("kind") == "import")
    return {
        **tree_figures(result),
        "export_workers": env.get("EXPORT_WORKERS"),
        "max_in_flight": max_in_flight,
        "seconds": report["timings"]["seconds"],
        "first_request_s": report["timings"]["first_request_s"],
        "read_fraction_at_first_request": watch.fraction,
        "status": report["status"],
        "error": report.get("error"),
        "mirror": report.get("mirror"),
        "exit_code": result.returncode,
        "rows_read": counts["read"],
        "sent": sent,
        "duplicates": counts["duplicates"],
        "rejected": counts["rejected_total"],
        "requests": req["count"] - imports,  # JSON requests (PUT /v3/marketing/contacts)
        "json_contacts": sent - import_contacts,
        "imports": imports,
        "import_contacts": import_contacts,
        "request_bytes": req["bytes"] if not imports else None,  # with imports the report mixes in gzip file sizes
        "sent_bytes": req["bytes"],  # request bodies and import files: what went over the link
        "max_request_bytes": req["max_bytes"] if not imports else None,
        "max_request_contacts": req["max_contacts"],
        "retries": req["retries"],
        "minimum_requests": minimum_requests(req["bytes"], sent) if not imports else None,
        # the same at the engine's own packing target (limits.REQUEST_BYTES_TARGET, a margin under 6,000,000)
        "minimum_requests_at_target": None if imports or not sent else minimum_requests(
            req["bytes"], sent, limits.REQUEST_BYTES_TARGET),
        "rss_samples": result.tree_samples,  # (s after spawn, RSS sum over the process tree, processes)
        "last_request_by_s": watch.last_put_at,  # within PUTS_EVERY_S (+ latency) after the last PUT arrived
        "tail_s": None if watch.last_put_at is None else result.wall_s - watch.last_put_at,
        "list_count": list_count(sandbox.url, api_key, sandbox.list_id, args.latency),
        "report": str(report_path),
    }


def run_naive(export: Export, sandbox: children.SandboxProcess, api_key: str, scale: float,
              latency: float, bandwidth_mbit: float | None = None) -> dict[str, Any]:
    figures, out = _baseline("naive", export, child_env(api_key, sandbox.url),
                             timeout_for(60, 900, export.rows, scale, latency, 1_500)
                             + link_s(export, bandwidth_mbit) * scale)
    return {**figures, "seconds": out["seconds"], "sent_s": out["sent_s"], "sent": out["sent"],
            "requests": out["requests"], "request_bytes": out["bytes"], "last_job_status": out["last_job_status"],
            "list_count": list_count(sandbox.url, api_key, out["list_id"], latency)}


def tree_summary(r: dict[str, Any]) -> str:
    """CPU and peak RSS of a run for the progress lines; the process tree's when it had more than one process."""
    text = f"CPU {r['cpu_s']:.2f} s, peak RSS {r['tree_peak_rss_bytes'] / MB:,.0f} MB"
    if r["processes_seen"] > 1 or r["orphans"]:
        text += (f" (process tree: {r['processes_seen']} processes, at most {r['max_processes']} at once, "
                 f"{r['cpu_orphans_s']:.2f} s CPU of {r['orphans']} left behind; the process alone: "
                 f"ru_maxrss {r['peak_rss_bytes'] / MB:,.0f} MB)")
    return text


def measure_size(n: int, args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    export, generated = ensure_export(args.bench_dir, n, args.seed)
    log(f"[{label(n)}] export {'generated' if generated else 'cached'} in {time.monotonic() - t0:.1f} s: "
        f"{export.rows:,} rows, {export.valid_distinct:,} distinct valid, {export.bad_rows:,} bad, "
        f"{export.duplicate_rows:,} duplicates, {len(export.partitions)} partitions, {export.bytes / MB:,.0f} MB")
    warm(export)
    row: dict[str, Any] = {"profiles": n, "repeat": args.repeat, "export": {
        "rows": export.rows, "valid_distinct": export.valid_distinct, "bad_rows": export.bad_rows,
        "duplicate_rows": export.duplicate_rows, "partitions": len(export.partitions), "bytes": export.bytes,
        "path": str(export.root)}}
    api_key, sandbox = start_sandbox(args.engine_root, work, nodelay=args.sandbox_nodelay, latency=args.latency,
                                     bandwidth_mbit=args.bandwidth_mbit)
    log(f"[{label(n)}] sandbox: python {' '.join(sandbox.argv[1:])}")
    floors: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    try:
        row["sandbox_rtt_ms"] = 1000 * round_trip_s(sandbox.url, api_key, sandbox.list_id, latency=args.latency)
        for attempt in range(1, args.repeat + 1):  # floor and engine alternate, so both meet the same conditions
            tag = f"[{label(n)}]" + (f" #{attempt}" if args.repeat > 1 else "")
            f = run_floor(export, args.timeout_scale)
            floors.append(f)
            log(f"{tag} floor  {f['wall_s']:7.2f} s, {tree_summary(f)}")
            load = os.getloadavg()[0]
            before = sandbox_cpu_s(sandbox)
            e = run_engine(export, sandbox, api_key, work, args)
            e.update(load_1min_before=load, sandbox_cpu_s=sandbox_cpu_s(sandbox) - before)
            engines.append(e)
            log(f"{tag} engine {e['wall_s']:7.2f} s, {tree_summary(e)}, {e['requests']} requests, "
                f"status {e['status']}, list holds {e['list_count']:,}" + mirror_summary(e.get("mirror")))
        if args.naive:
            row["naive"] = run_naive(export, sandbox, api_key, args.timeout_scale, args.latency, args.bandwidth_mbit)
            v = row["naive"]
            log(f"[{label(n)}] naive  {v['wall_s']:7.2f} s, {tree_summary(v)}, "
                f"{v['requests']} requests, list holds {v['list_count']:,}")
        if args.latency > 0:  # the latency table's variants, against the same sandbox
            row["latency"] = latency.measure_variants(
                lambda m: run_engine(export, sandbox, api_key, work, args, max_in_flight=m),
                args.takes_max_in_flight, min(engines, key=lambda e: e["wall_s"]), log, f"[{label(n)}]")
    finally:
        row["sandbox_peak_rss_bytes"] = sandbox.stop()
        shutil.rmtree(work / f"state-{export.profiles}", ignore_errors=True)
    row["floor"], row["floor_runs"] = best_of(floors)
    row["engine"], row["engine_runs"] = best_of(engines)
    row["load_1min_before_engine"] = row["engine"]["load_1min_before"]
    row["sandbox_cpu_during_engine_s"] = row["engine"]["sandbox_cpu_s"]
    row["derived"] = derive(row)
    if "latency" in row:
        row["latency_summary"] = latency.summary(row, args.bandwidth_mbit)
    return row


def mirror_summary(mirror: dict[str, Any] | None) -> str:
    """A mirror run's diff, for the progress line: what the previous snapshot held and who left."""
    if not mirror:
        return ""
    return (f", mirror: previous snapshot {mirror.get('previous', 0):,}, current {mirror.get('current', 0):,}, "
            f"to remove {mirror.get('to_remove', 0):,} ({mirror.get('guard_rail', '-')})")


RUN_SUMMARY = ("wall_s", "cpu_s", "cpu_orphans_s", "peak_rss_bytes", "tree_peak_rss_bytes", "first_request_s", "tail_s",
               "load_1min_before")


def best_of(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fastest run (by wall time), its peak RSS figures replaced by the highest of all runs; and a summary of
    each."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    for key in ("peak_rss_bytes", "tree_peak_rss_bytes"):
        best[key] = max(r[key] for r in runs)
    return best, [{k: r[k] for k in RUN_SUMMARY if k in r} for r in runs]


def derive(row: dict[str, Any]) -> dict[str, Any]:
    e, f, v = row["engine"], row["floor"], row.get("naive")
    sent, count, json_contacts = e["sent"], e["requests"], e["json_contacts"]
    d: dict[str, Any] = {
        "contacts_per_s": sent / e["wall_s"] if e["wall_s"] else None,
        "requests_per_100k": count / json_contacts * 100_000 if json_contacts else None,
        "avg_request_bytes": e["request_bytes"] / count if count and e["request_bytes"] is not None else None,
        "avg_request_contacts": json_contacts / count if count else None,
        "engine_vs_floor": e["wall_s"] / f["wall_s"],
        "engine_vs_floor_cpu": e["cpu_s"] / f["cpu_s"] if f["cpu_s"] else None,
        "naive_vs_engine": v["wall_s"] / e["wall_s"] if v else None,
        "list_correct": e["list_count"] == row["export"]["valid_distinct"] and e["status"] == "completed",
    }
    avg_bytes, avg_contacts = d["avg_request_bytes"], d["avg_request_contacts"]
    d["avg_fill_bytes_pct"] = None if avg_bytes is None else 100 * avg_bytes / limits.MAX_REQUEST_BYTES
    d["avg_fill_contacts_pct"] = None if avg_contacts is None else 100 * avg_contacts / limits.MAX_CONTACTS_PER_REQUEST
    if v:
        d["naive_list_correct"] = v["list_count"] == row["export"]["valid_distinct"]
    return d


# ------------------------------------------------------------------------------------------------------- targets


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_n = {r["profiles"]: r for r in rows}
    m1, m5 = by_n.get(1_000_000), by_n.get(5_000_000)
    out: list[dict[str, Any]] = []

    def add(name: str, value: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": value, "result": "n/a" if ok is None else "PASS" if ok else "MISS"})

    if m1:
        r = m1["derived"]["engine_vs_floor"]
        add(f"end to end at 1M <= {TARGET_ENGINE_VS_FLOOR}x floor time", f"{r:.2f}x", r <= TARGET_ENGINE_VS_FLOOR)
        r = m1["derived"]["naive_vs_engine"]
        add(f"end to end at 1M >= {TARGET_NAIVE_VS_ENGINE:g}x faster than naive",
            "naive not run" if r is None else f"{r:.1f}x", None if r is None else r >= TARGET_NAIVE_VS_ENGINE)
    else:
        add(f"end to end at 1M <= {TARGET_ENGINE_VS_FLOOR}x floor time", "1M not run", None)
        add(f"end to end at 1M >= {TARGET_NAIVE_VS_ENGINE:g}x faster than naive", "1M not run", None)
    if m5:
        rss = m5["engine"]["tree_peak_rss_bytes"]
        add("peak RSS (process tree) at 5M < 200 MB", f"{rss / MB:,.0f} MB", rss < TARGET_RSS_5M_BYTES)
    else:
        add("peak RSS (process tree) at 5M < 200 MB", "5M not run", None)
    if m1 and m5:
        g = growth_per_profile((1_000_000, m1["engine"]["tree_peak_rss_bytes"]),
                               (5_000_000, m5["engine"]["tree_peak_rss_bytes"]))
        add("RSS growth (process tree) 1M -> 5M <= 16 bytes/profile", f"{g:.1f} B/profile",
            g is not None and g <= TARGET_GROWTH_BYTES)
    else:
        add("RSS growth (process tree) 1M -> 5M <= 16 bytes/profile", "needs 1M and 5M", None)
    for r in rows:
        e = r["engine"]
        name = f"requests <= minimum + 1 at {label(r['profiles'])}"
        if e["minimum_requests"] is None:
            add(name, f"bulk path: {e['requests']} JSON requests + {e['imports']} imports", None)
        else:
            add(name, f"{e['requests']} vs minimum {e['minimum_requests']}", e["requests"] <= e["minimum_requests"] + 1)
    for r in rows:
        e = r["engine"]
        frac = e["read_fraction_at_first_request"]
        name = f"first request before the export is fully read at {label(r['profiles'])}"
        if frac is not None:
            add(name, f"{100 * frac:.1f}% read at {e['first_request_s']} s", frac < 1.0)
        else:
            add(name, "one request for the whole export" if e["requests"] + e["imports"] <= 1 else "not observed", None)
    return out


# -------------------------------------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _all_runs(row: dict[str, Any], key: str) -> str:
    runs = row.get(key) or []
    return f" (best of {', '.join(format(x['wall_s'], '.1f') for x in runs)})" if len(runs) > 1 else ""


TABLE: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("profiles (rows) / distinct valid", lambda r: f"{r['export']['rows']:,} / {r['export']['valid_distinct']:,}"),
    ("engine end to end, s", lambda r: _fmt(r["engine"]["wall_s"], ".2f") + _all_runs(r, "engine_runs")),
    ("  engine run (report), s", lambda r: _fmt(r["engine"]["seconds"], ".2f")),
    ("  engine CPU, process tree (user + sys), s", lambda r: _fmt(r["engine"]["cpu_s"], ".2f")),
    ("    of it descendants left behind, s", lambda r: _fmt(r["engine"].get("cpu_orphans_s"), ".2f")),
    ("contacts/s end to end", lambda r: _fmt(r["derived"]["contacts_per_s"])),
    ("first request left after, s", lambda r: _fmt(r["engine"]["first_request_s"], ".2f")),
    ("  after the last request (jobs, snapshot), s", lambda r: _fmt(r["engine"].get("tail_s"), ".2f")
     + (" (after the last JSON request: includes the imports)" if r["engine"]["imports"] else "")),
    ("  export read at first request", lambda r: "-" if r["engine"]["read_fraction_at_first_request"] is None
     else f"{100 * r['engine']['read_fraction_at_first_request']:.1f}%"),
    ("requests (actual / minimum)", lambda r: f"{r['engine']['requests']} / {_fmt(r['engine']['minimum_requests'])}"),
    (f"  minimum at the engine's {limits.REQUEST_BYTES_TARGET:,} target",
     lambda r: _fmt(r["engine"].get("minimum_requests_at_target"))),
    ("bulk imports (files / contacts)", lambda r: f"{r['engine']['imports']} / {r['engine']['import_contacts']:,}"),
    ("requests per 100,000 contacts", lambda r: _fmt(r["derived"]["requests_per_100k"], ".2f")),
    ("avg request fill, bytes", lambda r: "n/a (the report mixes in import file sizes)"
     if r["derived"]["avg_request_bytes"] is None else f"{_fmt(r['derived']['avg_request_bytes'])} "
     f"({_fmt(r['derived']['avg_fill_bytes_pct'], '.1f')}% of 6,000,000)"),
    ("avg request fill, contacts", lambda r: f"{_fmt(r['derived']['avg_request_contacts'])} "
     f"({_fmt(r['derived']['avg_fill_contacts_pct'], '.1f')}% of 30,000)"),
    ("engine peak RSS, process tree, MB", lambda r: _fmt(r["engine"]["tree_peak_rss_bytes"] / MB, ",.1f")),
    ("  export process alone (ru_maxrss), MB", lambda r: _fmt(r["engine"]["peak_rss_bytes"] / MB, ",.1f")),
    ("  sampled tree RSS peak at, s", lambda r: _fmt(r["engine"].get("tree_peak_at_s"), ".1f")),
    ("  processes (most at once / seen)", lambda r: f"{r['engine']['max_processes']} / "
     f"{r['engine']['processes_seen']}"),
    ("list holds all valid profiles", lambda r: "yes" if r["derived"]["list_correct"] else
     f"NO ({r['engine']['list_count']:,}, status {r['engine']['status']})"),
    ("floor (read + orjson), s", lambda r: _fmt(r["floor"]["wall_s"], ".2f") + _all_runs(r, "floor_runs")),
    ("  engine / floor", lambda r: f"{r['derived']['engine_vs_floor']:.2f}x"),
    ("  floor CPU, s; engine / floor CPU", lambda r: f"{r['floor']['cpu_s']:.2f}; "
     f"{_fmt(r['derived']['engine_vs_floor_cpu'], '.2f')}x"),
    ("  floor peak RSS, MB", lambda r: _fmt(r["floor"]["tree_peak_rss_bytes"] / MB, ",.1f")),
    ("naive (json, 1,000/PUT), s", lambda r: _fmt(r["naive"]["wall_s"], ".2f") if "naive" in r else "not run"),
    ("  naive / engine", lambda r: f"{r['derived']['naive_vs_engine']:.1f}x" if "naive" in r else "-"),
    ("  naive requests", lambda r: _fmt(r["naive"]["requests"]) if "naive" in r else "-"),
    ("  naive peak RSS, MB", lambda r: _fmt(r["naive"]["tree_peak_rss_bytes"] / MB, ",.1f") if "naive" in r else "-"),
    ("sandbox peak RSS, MB", lambda r: _fmt(r["sandbox_peak_rss_bytes"] / MB, ",.0f")),
    ("sandbox CPU during the engine run, s", lambda r: _fmt(r.get("sandbox_cpu_during_engine_s"), ".2f")),
    ("sandbox small-request round trip, ms", lambda r: _fmt(r.get("sandbox_rtt_ms"), ".1f")),
    ("load average before the engine run", lambda r: _fmt(r.get("load_1min_before_engine"), ".2f")),
]


def settings_lines(results: dict[str, Any]) -> list[str]:
    """What the run was measured under, printed above the table."""
    delay, bandwidth = results["latency_s"], results.get("bandwidth_mbit")
    workers, source = results["export_workers"], results["export_workers_source"]
    bulk = "none" if results["bulk_threshold"] is None else f"{results['bulk_threshold']:,}"
    return [
        f"sandbox latency: {delay:g} s before every answer (engine and naive alike)" if delay > 0
        else "sandbox latency: none (loopback only)",
        f"sandbox bandwidth: request bodies read at {bandwidth:g} Mbit/s at most" if bandwidth
        else "sandbox bandwidth: no cap",
        *([f"max_in_flight: {'built' if results.get('max_in_flight_built') else 'not built (the single sender only)'}"]
          if delay > 0 else []),
        f"engine workers: EXPORT_WORKERS={workers} ({source})" if workers is not None
        else "engine workers: EXPORT_WORKERS not set (the engine's default)",
        f"destination mode: {results.get('mode', 'upsert')}"
        + ("; its state is kept between repeats, so every run after the first diffs a full previous snapshot"
           if results.get("mode") == "mirror" else ""),
        f"bulk threshold: {bulk}; seed {results['seed']}; repeat {results['repeat']}; "
        f"process tree sampled every {results['tree_interval_s']:g} s"
        + ("" if results["subreaper"] else " (no subreaper: CPU of descendants left behind is missing)"),
    ]


def render(rows: list[dict[str, Any]], growth: dict[str, Any], targets: list[dict[str, Any]],
           settings: Sequence[str] = ()) -> str:
    width = max(len(name) for name, _ in TABLE)
    cells = [[fn(r) for r in rows] for _, fn in TABLE]
    col = [max(len(label(r["profiles"])), *(len(c[i]) for c in cells)) for i, r in enumerate(rows)]
    lines = [*settings, ""] if settings else []
    lines.append(" " * width + "  " + "  ".join(label(r["profiles"]).rjust(col[i]) for i, r in enumerate(rows)))
    lines.append("-" * len(lines[-1]))
    for (name, _), values in zip(TABLE, cells, strict=True):
        lines.append(name.ljust(width) + "  " + "  ".join(v.rjust(col[i]) for i, v in enumerate(values)))
    if growth.get("bytes_per_profile") is not None:
        lines.append(f"\nengine memory growth (process tree) {label(growth['from'])} -> {label(growth['to'])}: "
                     f"{growth['bytes_per_profile']:.1f} bytes per additional profile")
    lines.append("\ntargets (compared, not asserted):")
    tw = max(len(t["target"]) for t in targets)
    for t in targets:
        lines.append(f"  {t['result']:<4}  {t['target'].ljust(tw)}  {t['measured']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES),
                   help="comma-separated export sizes in profiles (k and M suffixes ok); default 100000,1000000")
    p.add_argument("--quick", action="store_true", help="sizes 20k,100k (overrides --sizes)")
    p.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the floor and the engine N times per size (alternating) and keep the fastest of each; "
                        "peak RSS is the highest of the N (the naive baseline runs once)")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive baseline")
    p.add_argument("--bench-dir", type=Path, default=REPO / ".bench", help="cache and results folder (default .bench)")
    p.add_argument("--bulk-threshold", type=int, default=None, metavar="N",
                   help="the destination's bulk_threshold (default: none, every contact goes as JSON requests)")
    p.add_argument("--engine-root", type=Path, default=REPO,
                   help="folder whose shared/ package runs the engine and sandbox (e.g. another checkout); default: "
                        "this repository")
    p.add_argument("--sandbox-nodelay", action="store_true",
                   help="run the sandbox with TCP_NODELAY (benchmarks/nodelay_sandbox.py): no ~40 ms stall per answer")
    p.add_argument("--latency", type=float, nargs="?", const=latency.NETWORK_LATENCY_S, default=0.0,
                   metavar="SECONDS",
                   help="the sandbox waits this long before answering every request (python -m shared sandbox "
                        "--latency), for the engine and the naive baseline alike: the WAN round trip and SendGrid's "
                        f"handling per request (alone: {latency.NETWORK_LATENCY_S:g} s), and the latency table is "
                        "added: end to end for naive, the single sender and max_in_flight 2 and 4; default 0 "
                        "(loopback only; the option is not passed)")
    p.add_argument("--bandwidth-mbit", type=float, default=None, metavar="N",
                   help="the sandbox reads request bodies no faster than N Mbit/s (python -m shared sandbox "
                        f"--bandwidth-mbit); default {latency.NETWORK_BANDWIDTH_MBIT:g} with --latency, none without; "
                        "0: no cap")
    p.add_argument("--imports", action="store_true",
                   help="also measure the import time of each door (benchmarks/imports.py) of the engine root")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="set EXPORT_WORKERS=N for the engine (0: parse in the export process itself, N: N worker "
                        "processes); default: not set by the benchmark (the engine's default, or the value in the "
                        "environment)")
    p.add_argument("--mode", choices=("upsert", "mirror"), default="upsert",
                   help="the destination's mode (default upsert); with mirror the run state is kept between "
                        "--repeat runs, so every run after the first diffs the previous run's full snapshot")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every child's timeout")
    return p


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
    if args.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    if args.latency < 0 or not math.isfinite(args.latency):
        print("--latency must be 0 or more seconds", file=sys.stderr)
        return 2
    if args.bandwidth_mbit is None and args.latency > 0:
        args.bandwidth_mbit = latency.NETWORK_BANDWIDTH_MBIT
    if args.bandwidth_mbit is not None and (args.bandwidth_mbit < 0 or not math.isfinite(args.bandwidth_mbit)):
        print("--bandwidth-mbit must be 0 (no cap) or more", file=sys.stderr)
        return 2
    args.bandwidth_mbit = args.bandwidth_mbit or None
    if args.workers is not None and args.workers < 0:
        print("--workers must be 0 or more", file=sys.stderr)
        return 2
    args.bench_dir = args.bench_dir.resolve()
    args.engine_root = args.engine_root.resolve()
    if not (args.engine_root / "shared" / "engine.py").is_file():
        print(f"--engine-root {args.engine_root} has no shared/engine.py", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    work = args.bench_dir / "runs" / started.strftime("%Y%m%dT%H%M%SZ")
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    version_at_start = engine_version(args.engine_root)
    if args.workers is not None:
        workers, workers_source = str(args.workers), "--workers"
    elif os.environ.get("EXPORT_WORKERS") is not None:
        workers, workers_source = os.environ["EXPORT_WORKERS"], "inherited from the environment"
    else:
        workers, workers_source = None, None
    args.takes_max_in_flight = args.latency > 0 and latency.engine_takes_max_in_flight(args.engine_root)
    settings = {"latency_s": args.latency, "bandwidth_mbit": args.bandwidth_mbit,
                "max_in_flight_built": args.takes_max_in_flight,
                "export_workers": workers, "export_workers_source": workers_source,
                "bulk_threshold": args.bulk_threshold, "mode": args.mode, "seed": args.seed, "repeat": args.repeat,
                "tree_interval_s": children.TREE_INTERVAL_S, "subreaper": children.become_subreaper()}
    for line in settings_lines(settings):
        log(line)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        log(f"note: the 1-minute load average is {load:.1f} on {os.cpu_count()} CPUs: other work competes with the "
            "benchmark and its figures will be noisy")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for n in args.sizes:
            rows.append(measure_size(n, args, work, log))
    except KeyboardInterrupt:
        log("interrupted: stopping child processes")
        return 130
    except RuntimeError as exc:  # a child failed, timed out or printed nothing usable: the message says which
        log(f"error: {exc}")
        return 1
    finally:
        children.stop_all()
        signal.signal(signal.SIGTERM, previous)
    growth: dict[str, Any] = {}
    if len(rows) >= 2:
        small, big = rows[-2], rows[-1]
        growth = {"from": small["profiles"], "to": big["profiles"], "bytes_per_profile": growth_per_profile(
            (small["profiles"], small["engine"]["tree_peak_rss_bytes"]),
            (big["profiles"], big["engine"]["tree_peak_rss_bytes"]))}
    targets = evaluate_targets(rows)
    if args.latency > 0:
        targets += latency.targets(rows, args.latency, args.bandwidth_mbit)
    doors = door_imports.measure([args.engine_root], 5) if args.imports else None
    results = {"date": started.isoformat(timespec="seconds").replace("+00:00", "Z"), "machine": machine(),
               "load_1min_at_start": load, "engine_version": version_at_start,
               "engine_changed_during_run": engine_version(args.engine_root) != version_at_start,
               **settings, "sizes": args.sizes, "job_delay_s": JOB_DELAY_S,
               "engine_root": str(args.engine_root), "naive": args.naive, "sandbox_nodelay": args.sandbox_nodelay,
               "total_s": time.monotonic() - t0,
               "results": rows, "memory_growth": growth, "targets": targets, "door_imports": doors}
    out = args.bench_dir / f"results-{started.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(render(rows, growth, targets, settings_lines(results)))
    if args.latency > 0:
        print("\n" + latency.render(rows, args.latency, args.bandwidth_mbit, label))
    if doors is not None:
        print("\nimport time of each door (median of 5 fresh interpreters):\n"
              + door_imports.render(doors, [args.engine_root]))
    version = results["engine_version"]
    changed = version["uncommitted_shared_files"]
    dirty = f" + uncommitted changes in {', '.join(changed)}" if changed else ""
    print(f"\nengine: commit {version['commit']}{dirty}")
    if results["engine_changed_during_run"]:
        print("WARNING: shared/ changed while the benchmark ran (another commit or edit): the sizes may have run "
              "different engine code")
    print(f"total {results['total_s']:.0f} s; results {out}; engine reports in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
