"""A daily refresh in which 1% of the profiles changed, beside a full send of the same export (issue 14).

    python -m benchmarks.refresh --profiles 1000000 [--changed 0.01] [--dir .bench/refresh]

Three engine runs into one sandbox, each a child process measured like `benchmarks.run`'s (CPU of the process tree,
peak RSS): the first run (a full send: no record of what was sent), the refresh of the same export after `--changed`
of its profiles changed (a delta run), and a `--full-resync` of that export. Prints one table and writes
`<dir>/refresh-results.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sandbox import samplegen

from . import children
from .run import MB, REPO, child_env, engine_config, export_args, machine, start_sandbox, tree_figures


def _copy_export(export_root: Path, profiles: int, seed: int) -> tuple[Path, samplegen.ExportInfo]:
    """A fresh export of its own (the refresh changes it in place)."""
    shutil.rmtree(export_root, ignore_errors=True)
    info = samplegen.write_cdm_export(export_root, profiles, seed=seed, partitions=max(4, -(-profiles // 500_000)))
    return export_root / info.model_key, info


def _engine(argv_tail: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    result = children.run_child([sys.executable, "-m", "shared", *argv_tail], env=env, cwd=REPO, timeout=timeout)
    if result.timed_out:
        raise RuntimeError(f"the engine timed out after {result.wall_s:.0f} s")
    report_path = Path(argv_tail[argv_tail.index("--report") + 1])
    report = json.loads(report_path.read_text())
    return {**tree_figures(result), "status": report["status"], "sync": report.get("sync"),
            "changes": report.get("changes"), "sent": report["counts"]["sent"],
            "requests": report["requests"]["count"], "seconds": report["timings"]["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refresh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=1_000_000, help="rows in the export (default 1,000,000)")
    parser.add_argument("--changed", type=float, default=0.01, help="share of profiles that change (default 0.01)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated export")
    parser.add_argument("--dir", default=".bench/refresh", help="working folder (default .bench/refresh)")
    args = parser.parse_args(argv)
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_json, info = _copy_export(work / "export", args.profiles, args.seed)
    api_key, sandbox = start_sandbox(REPO, work)
    rows: dict[str, dict[str, Any]] = {}
    try:
        config = work / "destinations.json"
        config.write_text(json.dumps(engine_config(sandbox.list_id, None), indent=2))
        env = child_env(api_key, sandbox.url)
        timeout = 120 + 600 * args.profiles / 1_000_000
        state = work / "state"
        shutil.rmtree(state, ignore_errors=True)
        rows["first run (full)"] = _engine(export_args(config, model_json, state, work / "r1.json"), env, timeout)
        changed = samplegen.change_profiles(work / "export", info, int(info.valid_distinct * args.changed))
        rows[f"refresh, {changed:,} changed (delta)"] = _engine(
            export_args(config, model_json, state, work / "r2.json"), env, timeout)
        rows["the same, --full-resync"] = _engine(
            [*export_args(config, model_json, state, work / "r3.json"), "--full-resync"], env, timeout)
    finally:
        sandbox.stop()
    print(f"\n{args.profiles:,} profiles ({info.valid_distinct:,} distinct valid), {time.strftime('%Y-%m-%d %H:%M')}")
    print("| run | kind | contacts sent | requests | engine CPU | peak RSS | end to end |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {(r['sync'] or {}).get('kind')} | {r['sent']:,} | {r['requests']} | {r['cpu_s']:.2f} s "
              f"| {r['tree_peak_rss_bytes'] / MB:,.0f} MB | {r['wall_s']:.2f} s |")
    (work / "refresh-results.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2,
                                                          default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
