"""Import time of each door: what a new process spends importing before a door can answer (issue 16, cold start).

    python -m benchmarks.imports [--repeat 7] [--engine-root /path/to/other/checkout ...]

Every figure comes from a fresh interpreter (a child process per measurement, the doors and roots interleaved), the
median of `--repeat` runs, wall and CPU time from the first import to the door being ready (interpreter start-up not
included). A Functions worker process imports `function_app` once for all its triggers, so the Functions doors are
that import plus what the door imports when it first runs:

- function_app: the module alone (every trigger's cold start);
- HTTP read routes: function_app, then GET /destinations, GET /destinations/{name}/runs and GET /runs/{id} answered
  through `http_api.handle` over a state folder (no storage account: the same code and imports, local I/O);
- blob / timer: function_app plus what `app.on_blob` and `app.on_timer` import (the engine, routing, purge);
- queue: function_app plus what `queue_worker.work` imports (the engine, purge);
- CLI: `shared.cli` (`python -m shared`).

The first row is the floor no change to this app can lower: `azure.functions` and the blob binding extension, which
function_app imports for the blob trigger's `BlobClient` parameter (the worker resolves that annotation when it
indexes the functions, so it cannot wait; it brings azure.storage.blob and azure.identity, which the app's own
storage clients need anyway). A door's own share is its figure minus that row's.

"over the worker" starts the clock after `azure.functions` is imported, as the Python worker has it loaded (it
builds its binding registry from it) before it imports the app; the CLI has no such column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WATCHED = ("numpy", "shared.engine", "shared.stream", "shared.pipeline")

_HTTP_READS = """
import orjson, tempfile
from shared import http_api
from shared.context import AppContext, Settings
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore
folder = tempfile.mkdtemp()
store = LocalFolderStore(folder)
store.write_bytes("destinations.json", orjson.dumps({"destinations": [{"name": "vip", "list_id":
    "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10", "api_key_secret": "k", "segments": ["S"], "mapping": {"email": "E"}}]}))
ctx = AppContext(Settings.from_env({"DESTINATIONS_CONFIG": "blob:destinations.json"}), store, StateStore(store),
                 EnvSecrets({}))
for route, params in (("destinations", {}), ("destinations/{name}/runs", {"name": "vip"}),
                      ("runs/{run_id}", {"run_id": "20260101T120000Z-0a1b2c3d"})):
    status = http_api.handle("GET", route, params, {}, b"", ctx).status
    assert status in (200, 404), (route, status)
"""

# door -> (code run before the clock starts "over the worker", the door's code); None: no such column
DOORS: dict[str, tuple[str | None, str]] = {
    "platform: azure.functions + the blob binding extension": (
        "import azure.functions", "import azure.functions\nimport azurefunctions.extensions.bindings.blob"),
    "function_app": ("import azure.functions", "import function_app"),
    "HTTP read routes": ("import azure.functions", "import function_app" + _HTTP_READS),
    "blob / timer": ("import azure.functions", "import function_app\nfrom shared import engine, purge, queue_worker,"
                                               " routing"),
    "queue": ("import azure.functions", "import function_app\nfrom shared import engine, purge, queue_worker"),
    "CLI": (None, "import shared.cli"),
}

_CHILD = """
import json, sys, time
{pre}
wall, cpu = time.perf_counter(), time.process_time()
{door}
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, "modules": len(sys.modules),
                  "watched": [m for m in {watched!r} if m in sys.modules]}}))
"""


def measure_once(root: Path, door: str, over_worker: bool) -> dict[str, Any]:
    pre, code = DOORS[door]
    source = _CHILD.format(pre=pre if over_worker and pre else "", door=code, watched=WATCHED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID_", "KEY_VAULT"))}
    env["PYTHONPATH"] = str(root)
    with tempfile.TemporaryDirectory() as cwd:  # no stray module of the caller's folder shadows the root's
        out = subprocess.run([sys.executable, "-c", source], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{door} from {root} failed: {out.stderr.strip()[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(roots: Sequence[Path], repeat: int) -> list[dict[str, Any]]:
    """Per root, door and column (bare, over the worker): the median wall and CPU time of `repeat` fresh runs."""
    cases = [(root, door, over) for root in roots for door, (pre, _) in DOORS.items()
             for over in ((False, True) if pre else (False,))]
    runs: dict[tuple[Path, str, bool], list[dict[str, Any]]] = {case: [] for case in cases}
    for _ in range(repeat):  # interleaved: a load change on the machine touches every case alike
        for case in cases:
            runs[case].append(measure_once(*case))
    return [{"root": str(root), "door": door, "over_worker": over,
             "wall_s": statistics.median(r["wall_s"] for r in runs[(root, door, over)]),
             "cpu_s": statistics.median(r["cpu_s"] for r in runs[(root, door, over)]),
             "modules": runs[(root, door, over)][-1]["modules"], "watched": runs[(root, door, over)][-1]["watched"]}
            for root, door, over in cases]


def render(results: Sequence[dict[str, Any]], roots: Sequence[Path]) -> str:
    """One row per door: per root, CPU (wall) seconds from a bare interpreter and over the worker's own imports."""
    by = {(r["root"], r["door"], r["over_worker"]): r for r in results}
    names = [str(root) for root in roots]
    lines = ["| door | " + " | ".join(f"{n}: CPU (wall), s | over the worker: CPU (wall), s | loads numpy / engine"
                                        for n in names) + " |",
             "|---|" + "---|---|---|" * len(names)]

    def fig(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{r['cpu_s']:.3f} ({r['wall_s']:.3f})"

    for door in DOORS:
        cells = []
        for name in names:
            bare = by[(name, door, False)]
            cells += [fig(bare), fig(by.get((name, door, True))), "yes" if bare["watched"] else "no"]
        lines.append(f"| {door} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.imports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=7, help="fresh interpreters per door and root; the median is kept")
    p.add_argument("--engine-root", type=Path, action="append", default=[],
                   help="another checkout to measure beside this one (e.g. before a change); may be repeated")
    args = p.parse_args(argv)
    roots = [REPO, *(r.resolve() for r in args.engine_root)]
    print(render(measure(roots, max(1, args.repeat)), roots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
