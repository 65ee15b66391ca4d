"""Where the engine's time goes, two ways (`python -m benchmarks.profile_engine [--profiles 1000000]`):

1. stages: the read -> map -> de-duplicate -> encode -> pack pipeline rebuilt from the public module functions and run
   one stage longer each time over the whole export, single-threaded, without network or profiler overhead. The
   difference between two passes is what the added stage costs.
2. cprofile: the real CLI export (`shared.cli.main`) in a child process against the sandbox (another child), with a
   cProfile per thread (the parsing thread and the sender thread), top functions by own time. Profiles are kept
   under .bench/profile/<time>/ for `python -m pstats` or snakeviz.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import itertools
import json
import pstats
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import children
from .exports import Export, ensure_export, warm
from .run import DESTINATION, FIELDS, JOB_DELAY_S, REPO, child_env, engine_config

CHUNK = 4096  # rows per chunk, as the engine reads them


# --------------------------------------------------------------------------------------------------------- stages


def _mapper() -> Any:
    from shared import contacts, samplegen

    dest = samplegen.demo_destinations("00000000-0000-0000-0000-000000000000")["destinations"][0]
    custom = [contacts.CustomField("lifetime_value", "e1_N", "Number", dest["custom_fields"]["lifetime_value"]),
              contacts.CustomField("signup_date", "e2_D", "Date", dest["custom_fields"]["signup_date"])]
    return contacts.ContactMapper(dest["mapping"], custom)


def _rows(export: Export, columns: Sequence[str]) -> Iterator[tuple[int, Any, Any]]:
    from shared import sources
    from shared.storage import LocalFolderStore

    store = LocalFolderStore(export.root)
    key = str(export.model_json.relative_to(export.root))
    for part in sources.discover(store, key):
        yield from sources.read_rows(store, part, columns, required=(columns[0],))


def pipeline(export: Export, depth: int) -> int:
    """Run the first `depth` stages over the export; returns a count so nothing is optimised away."""
    from shared import batching, contacts, snapshots
    from shared.storage import LocalFolderStore

    if depth == 0:  # the bare csv module over the files
        n = 0
        for path in export.partitions:
            with open(path, encoding="utf-8", newline="") as fh:
                for _ in csv.reader(fh):
                    n += 1
        return n
    mapper = _mapper()
    rows = _rows(export, mapper.columns)
    if depth == 1:
        return sum(1 for _ in rows)
    deduper = contacts.Deduper()
    mapped_n = 0

    def fresh() -> Iterator[tuple[str, dict[str, Any]]]:
        nonlocal mapped_n
        while chunk := list(itertools.islice(rows, CHUNK)):
            kept = []
            for _line, values, _reason in chunk:
                if values is None:
                    continue
                m = mapper.map(values)
                if type(m) is not str:
                    kept.append(m)
            mapped_n += len(kept)
            if depth == 2:
                continue
            mask = deduper.first_seen(contacts.fingerprints([k[0] for k in kept]))
            for (email, contact, _note), new in zip(kept, mask, strict=True):
                if new:
                    yield email, contact

    if depth == 2:
        for _ in fresh():
            pass
        return mapped_n
    if depth == 3:
        return sum(1 for _ in fresh())
    encoded = ((email, contacts.encode(c)) for email, c in fresh())
    if depth == 4:
        return sum(len(b) for _, b in encoded)
    list_ids = ["00000000-0000-0000-0000-000000000000"]
    items = ((i, email, b) for i, (email, b) in enumerate(encoded))
    sorter = snapshots.EmailSorter() if depth >= 6 else None
    total = 0
    for batch in batching.pack(items, lambda t: len(t[2]), overhead=batching.body_overhead(list_ids),
                               collect=batching.ContactBatch):  # as engine._Run.work packs them
        total += len(batch.body(list_ids))
        if sorter is not None:  # the engine feeds it per de-duplicated chunk; per batch is the same work
            sorter.extend(batch.emails)
    if sorter is not None:  # engine._sync_snapshot on a first run of an upsert destination
        with tempfile.TemporaryDirectory() as tmp, sorter:
            store = LocalFolderStore(tmp)
            total += snapshots.write_snapshot(store, "snapshot.gz",
                                              snapshots.union_sorted(snapshots.read_snapshot(store, "snapshot.gz"),
                                                                     sorter.sorted_unique()))
    return total


STAGES = ("csv.reader over the files (reference)", "sources.read_rows (engine's reader)", "+ ContactMapper.map",
          "+ fingerprints + Deduper.first_seen", "+ contacts.encode (orjson)", "+ batching.pack (ContactBatch) + body",
          "+ list snapshot (EmailSorter, write_snapshot)")


def run_stages(export: Export, log: Callable[[str], None], repeat: int = 1) -> list[dict[str, Any]]:
    """Each pass timed by the process's CPU time (robust when other work shares the machine) and wall time; with
    repeat > 1 the best of the passes is kept."""
    out = []
    prev = None
    pipeline(export, len(STAGES) - 1)  # warm-up: imports, regex compilation, allocator arenas
    for depth, name in enumerate(STAGES):
        cpu = wall = float("inf")
        for _ in range(repeat):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            pipeline(export, depth)
            cpu = min(cpu, time.process_time() - start_cpu)
            wall = min(wall, time.perf_counter() - start_wall)
        added = None if prev is None or depth == 1 else cpu - prev
        out.append({"stage": name, "cpu_s": cpu, "wall_s": wall, "added_cpu_s": added,
                    "us_per_row": 1e6 * (added if added is not None else cpu) / export.rows})
        log(f"  {name:<42} {cpu:7.2f} s CPU ({wall:6.2f} s wall)"
            + ("" if added is None else f"   +{added:5.2f} s = {1e6 * added / export.rows:.2f} us/row"))
        prev = cpu
    return out


# ------------------------------------------------------------------------------------------------------- cprofile


def child_main(outdir: Path, argv: Sequence[str]) -> int:
    """In the profiled child: the CLI with a cProfile on the main thread and one on every thread it starts."""
    from shared import cli

    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()
            prof.dump_stats(outdir / f"thread-{self.name}.prof")

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    prof = cProfile.Profile()
    prof.enable()
    try:
        code = cli.main(list(argv))
    finally:
        prof.disable()
        prof.dump_stats(outdir / "thread-main.prof")
    return code


def top(path: Path, limit: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    text = buf.getvalue()
    return text[text.find("   ncalls"):] if "   ncalls" in text else text


def run_cprofile(export: Export, outdir: Path, limit: int, engine_root: Path) -> dict[str, Any]:
    import secrets

    api_key = "SG.bench." + secrets.token_urlsafe(24)
    sandbox = children.SandboxProcess.start(env=child_env(api_key), cwd=engine_root, list_id=str(uuid.uuid4()),
                                            fields=FIELDS, job_delay=JOB_DELAY_S, log_dir=outdir)
    try:
        config = outdir / "destinations.json"
        config.write_text(json.dumps(engine_config(sandbox.list_id, None), indent=2))
        report = outdir / "report.json"
        argv = [sys.executable, "-m", "benchmarks.profile_engine", "--child", str(outdir), "--", "export",
                "--config", str(config), "--destination", DESTINATION, "--source", str(export.model_json),
                "--state-dir", str(outdir / "state"), "--wait", "--quiet", "--report", str(report)]
        env = child_env(api_key, sandbox.url)
        env["PYTHONPATH"] = f"{engine_root}:{REPO}" if engine_root != REPO else str(REPO)
        result = children.run_child(argv, env=env, cwd=REPO, timeout=60 + 1200 * export.rows / 1e6)
    finally:
        sandbox.stop()
    if result.returncode != 0:
        raise RuntimeError(f"profiled export failed ({result.returncode}): {result.stderr[-2000:]}")
    rep = json.loads(report.read_text())
    return {"wall_s": result.wall_s, "report_seconds": rep["timings"]["seconds"], "status": rep["status"],
            "threads": {p.stem: top(p, limit) for p in sorted(outdir.glob("thread-*.prof"))}}


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:
        return child_main(Path(args_list[1]), args_list[3:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bench-dir", type=Path, default=REPO / ".bench")
    p.add_argument("--top", type=int, default=25, help="functions listed per thread")
    p.add_argument("--repeat", type=int, default=1, help="passes per stage; the best is kept")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--skip-cprofile", action="store_true")
    p.add_argument("--engine-root", type=Path, default=REPO, help="folder whose shared/ runs (stages use this repo's)")
    args = p.parse_args(args_list)
    export, _ = ensure_export(args.bench_dir.resolve(), args.profiles, args.seed)
    warm(export)
    outdir = args.bench_dir.resolve() / "profile" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"profiles": args.profiles, "seed": args.seed}

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        if not args.skip_stages:
            log(f"stages over {export.rows:,} rows (single thread, no network; each line adds one stage):")
            results["stages"] = run_stages(export, log, args.repeat)
        if not args.skip_cprofile:
            log("\ncProfile of the CLI export against the sandbox ...")
            prof = run_cprofile(export, outdir, args.top, args.engine_root.resolve())
            results["cprofile"] = {k: v for k, v in prof.items() if k != "threads"}
            for name, text in prof["threads"].items():
                log(f"\n== {name} (status {prof['status']}, {prof['wall_s']:.1f} s under the profiler)\n{text}")
    except KeyboardInterrupt:
        return 130
    finally:
        children.stop_all()
    (outdir / "summary.json").write_text(json.dumps(results, indent=2))
    log(f"profiles and summary in {outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
