"""Where the engine's time goes, two ways (`python -m benchmarks.profile_engine [--profiles 1000000]`):

1. stages: the engine's in-process path (read -> map, encode and fingerprint a chunk -> de-duplicate -> pack ->
   snapshot, as engine._Run.kept_chunks and work run it with no worker processes) rebuilt from the public module
   functions and run one stage longer each time over the whole export, single-threaded, without network or profiler
   overhead. The difference between two passes is what the added stage costs.
2. cprofile: the real CLI export (`shared.cli.main`) in a child process against the sandbox (another child), with a
   cProfile per thread (the parsing thread and the sender thread), top functions by own time. Profiles are kept
   under .bench/profile/<time>/ for `python -m pstats` or snakeviz.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import children
from .exports import Export, ensure_export, warm
from .run import FIELDS, REPO, child_env, engine_config, export_args, start_sandbox, timeout_for

# --------------------------------------------------------------------------------------------------------- stages


def _mapper() -> Any:
    from sandbox import samplegen
    from shared import contacts

    dest = samplegen.demo_destinations("00000000-0000-0000-0000-000000000000")["destinations"][0]
    custom = [contacts.CustomField(name, f"e{k}_{ftype[0]}", ftype, dest["custom_fields"][name])
              for k, (name, ftype) in enumerate((f.split(":") for f in FIELDS), 1)]
    return contacts.ContactMapper(dest["mapping"], custom)


def _chunks(export: Export, columns: Sequence[str]) -> Iterator[list[Any]]:
    """The rows as the engine reads them in this process: each partition's, pipeline.ROWS_PER_CHUNK at a time."""
    from shared import pipeline, sources
    from shared.storage import LocalFolderStore

    store = LocalFolderStore(export.root)
    key = str(export.model_json.relative_to(export.root))
    for part in sources.discover(store, key):
        rows = sources.read_rows(store, part, columns, required=(columns[0],))
        yield from pipeline.chunked(rows, pipeline.ROWS_PER_CHUNK)


def stages_pass(export: Export, depth: int) -> int:
    """Run the first `depth` stages over the export; returns a count so nothing is optimised away."""
    import numpy as np

    from shared import batching, dedup, delta, pipeline, snapshots
    from shared.storage import LocalFolderStore

    if depth == 0:  # the bare csv module over the files
        n = 0
        for path in export.partitions:
            with open(path, encoding="utf-8", newline="") as fh:
                for _ in csv.reader(fh):
                    n += 1
        return n
    mapper = _mapper()
    chunks = _chunks(export, mapper.columns)
    if depth == 1:
        return sum(len(chunk) for chunk in chunks)
    if depth == 2:  # the mapping alone, as map_rows calls it
        mapfn, n = mapper.map, 0
        for chunk in chunks:
            for _line, values, _reason in chunk:
                if values is not None and type(mapfn(values)) is not str:
                    n += 1
            mapper.trimmed.clear()
        return n
    # what pipeline.mapped_chunks does, no workers; from the record's stage on with each contact's content digest
    mapped = (pipeline.map_rows(mapper, chunk, digests=depth >= 6) for chunk in chunks)
    if depth == 3:
        return sum(len(chunk.data) for chunk in mapped)
    deduper = dedup.Deduper()
    recorder = snapshots.EmailSorter() if depth >= 6 else None  # every contact's record line (Stream.kept_chunks)
    sorter = snapshots.EmailSorter() if depth >= 7 else None

    def kept_chunks() -> Iterator[tuple[pipeline.MappedChunk, list[int]]]:  # as engine._Run.kept_chunks
        for chunk in mapped:
            if chunk.emails:
                keep: list[int] = np.flatnonzero(deduper.first_seen(chunk.fps)).tolist()
                if keep:
                    emails = chunk.emails
                    if recorder is not None:
                        digests = chunk.digests
                        recorder.extend([delta.line(emails[k], digests[8 * k : 8 * k + 8]) for k in keep])
                    if sorter is not None:
                        sorter.extend(emails if len(keep) == len(emails) else [emails[k] for k in keep])
                    yield chunk, keep

    if depth == 4:
        return sum(len(keep) for _, keep in kept_chunks())
    list_ids = ["00000000-0000-0000-0000-000000000000"]
    packer = batching.Packer(batching.body_overhead(list_ids))
    total = index = 0
    for chunk, keep in kept_chunks():  # as engine._Run.work packs them (all as JSON requests, from the start)
        start, index = index, index + len(keep)
        for batch in packer.add(chunk.data, chunk.ends, chunk.emails, keep, start):
            total += len(batch.body(list_ids))
    if (batch := packer.flush()) is not None:
        total += len(batch.body(list_ids))
    if recorder is not None:  # engine._stage_and_compare on a first run: staged, compared with no record
        with tempfile.TemporaryDirectory() as tmp, recorder:
            store = LocalFolderStore(tmp)
            total += snapshots.write_snapshot(store, "staged.gz", recorder.sorted_unique(), trusted=True)
            total += delta.classify(store, "record.gz", "snapshot.gz", "staged.gz", want_filter=False)[0]["new"]
    if sorter is not None:  # engine._sync_snapshot on a first run of an upsert destination
        with tempfile.TemporaryDirectory() as tmp, sorter:
            store = LocalFolderStore(tmp)
            total += snapshots.write_snapshot(store, "snapshot.gz",
                                              snapshots.union_sorted(snapshots.read_snapshot(store, "snapshot.gz"),
                                                                     sorter.sorted_unique()), trusted=True)
    return total


STAGES = ("csv.reader over the files (reference)", "sources.read_rows in chunks (engine's reader)",
          "+ ContactMapper.map", "+ orjson into the chunk (= pipeline.map_rows)", "+ hash() + Deduper.first_seen",
          "+ batching.Packer.add + ContactBatch.body",
          "+ delta record (digests, sorted, staged, compared)", "+ list snapshot (EmailSorter, write_snapshot)")


def run_stages(export: Export, log: Callable[[str], None], repeat: int = 1) -> list[dict[str, Any]]:
    """Each pass timed by the process's CPU time (robust when other work shares the machine) and wall time; with
    repeat > 1 the best of the passes is kept."""
    out = []
    prev = None
    stages_pass(export, len(STAGES) - 1)  # warm-up: imports, regex compilation, allocator arenas
    for depth, name in enumerate(STAGES):
        cpu = wall = float("inf")
        for _ in range(repeat):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            stages_pass(export, depth)
            cpu = min(cpu, time.process_time() - start_cpu)
            wall = min(wall, time.perf_counter() - start_wall)
        added = None if prev is None or depth == 1 else cpu - prev
        out.append({"stage": name, "cpu_s": cpu, "wall_s": wall, "added_cpu_s": added,
                    "us_per_row": 1e6 * (added if added is not None else cpu) / export.rows})
        log(f"  {name:<52} {cpu:7.2f} s CPU ({wall:6.2f} s wall)"
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
    api_key, sandbox = start_sandbox(engine_root, outdir)
    try:
        config = outdir / "destinations.json"
        config.write_text(json.dumps(engine_config(sandbox.list_id, None), indent=2))
        report = outdir / "report.json"
        argv = [sys.executable, "-m", "benchmarks.profile_engine", "--child", str(outdir), "--",
                *export_args(config, export.model_json, outdir / "state", report)]
        env = child_env(api_key, sandbox.url)
        env["PYTHONPATH"] = f"{engine_root}:{REPO}" if engine_root != REPO else str(REPO)
        result = children.run_child(argv, env=env, cwd=REPO, timeout=timeout_for(60, 1200, export.rows, 1.0))
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
