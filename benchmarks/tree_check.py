"""Checks how children.run_child accounts for a child's process tree, on small known workloads.

    python -m benchmarks.tree_check [--burn 1.0] [--mb 60]

Each case runs `python -m benchmarks.tree_check --case CASE` through run_child and prints what wait4 alone reports
(the child's CPU and ru_maxrss) next to the tree figures (CPU including the orphans the benchmark reaped, the peak of
the sampled RSS sum). In the pool cases, two workers each burn --burn CPU seconds while holding --mb MB, and the child
itself burns 0.3 s:

- single: no descendants: the tree figures equal wait4's.
- subprocess: two grandchildren in sequence, each waited for (subprocess.run), one of them through an intermediate
  process: wait4 already includes their CPU (Linux: a reaped process's rusage includes what it reaped).
- spawn: a ProcessPoolExecutor with the "spawn" context: the workers are children of the child and are joined, so
  wait4 includes their CPU, and its ru_maxrss is the largest single process's; only the tree sum sees both workers'
  memory at once. The resource tracker is left behind (orphan).
- forkserver: the workers are children of the forkserver, which reaps them but is never reaped by the child: without
  the subreaper, wait4 misses the workers' CPU entirely.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import children

REPO = Path(__file__).resolve().parent.parent
CASES = ("single", "subprocess", "spawn", "forkserver")
ROOT_BURN_S = 0.3
MB = 1_000_000


def burn(seconds: float, mb: int = 0) -> int:
    """Burn `seconds` of CPU while holding `mb` MB of touched memory; for at least `seconds` of wall time too."""
    hold = b"\x01" * (mb * MB)
    end_cpu, end_wall = time.process_time() + seconds, time.monotonic() + seconds
    x = 0
    while time.process_time() < end_cpu or time.monotonic() < end_wall:
        x += 1
    return len(hold) + (x & 0)


def case(name: str, seconds: float, mb: int) -> None:
    if name == "subprocess":
        leaf = [sys.executable, "-m", "benchmarks.tree_check", "--leaf", "--burn", str(seconds), "--mb", str(mb)]
        subprocess.run(leaf, check=True)
        subprocess.run([sys.executable, "-c", f"import subprocess; subprocess.run({leaf!r}, check=True)"], check=True)
    elif name in ("spawn", "forkserver"):
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(name)) as pool:
            list(pool.map(burn, [seconds, seconds], [mb, mb]))
    burn(ROOT_BURN_S)


def check(name: str, seconds: float, mb: int) -> str:
    argv = [sys.executable, "-m", "benchmarks.tree_check", "--case", name, "--burn", str(seconds), "--mb", str(mb)]
    r = children.run_child(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{name} exited with {r.returncode}: {r.stderr[-2000:]}")
    burnt = ROOT_BURN_S + (2 * seconds if name != "single" else 0)
    rss = (r.peak_rss_bytes / MB, r.tree_sampled_peak_rss_bytes / MB, r.tree_peak_rss_bytes / MB)
    return (f"{name:<10}  {r.wall_s:6.2f}  {burnt:6.2f}  {r.reaped_cpu_s:6.2f}  {r.orphan_cpu_s:6.2f}  {r.cpu_s:6.2f}"
            f"  {rss[0]:7.1f}  {rss[1]:7.1f}  {rss[2]:7.1f}  {r.max_processes:3d}/{r.processes_seen:<3d}"
            f"  {r.orphans:3d}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tree_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burn", type=float, default=1.0, help="CPU seconds per worker (default 1.0)")
    p.add_argument("--mb", type=int, default=60, help="MB each worker holds (default 60)")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # inside the child
    p.add_argument("--leaf", action="store_true", help=argparse.SUPPRESS)  # a grandchild of the subprocess case
    args = p.parse_args(argv)
    if args.leaf:
        burn(args.burn, args.mb)
        return 0
    if args.case:
        case(args.case, args.burn, args.mb)
        return 0
    print(f"subreaper: {children.become_subreaper()}; tree sampled every {children.TREE_INTERVAL_S} s")
    print("case          wall  burnt   wait4  orphan  tree    own max  sampled  tree     procs    orphans")
    print("                s   CPU s   CPU s   CPU s  CPU s   RSS MB   sum MB   peak MB  max/seen")
    try:
        for name in CASES:
            print(check(name, args.burn, args.mb), flush=True)
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
