"""The latency report of the benchmark (`./dev bench --latency [SECONDS]`, issue 16): on loopback the engine is
CPU-bound, against SendGrid it is bound by latency and upload bandwidth. With a network profile on the sandbox
(every answer waits SECONDS, default 0.25; request bodies are read at no more than `--bandwidth-mbit`, default 100),
each size reports end to end for the naive baseline, today's single sender and `max_in_flight` 2 and 4 (the
destination field of issue 16's second decision): variants the engine does not accept yet say "not built".

The time "the bytes alone need" is every request body (and import file) the engine sent, at the bandwidth: what no
number of requests in flight can beat. Figures are wall times of the export process, as the standard table's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NETWORK_LATENCY_S = 0.25  # per request: the WAN round trip and SendGrid's handling
NETWORK_BANDWIDTH_MBIT = 100.0  # the upload link
IN_FLIGHT = (1, 2, 4)  # max_in_flight values reported; 1 is the single sender
TARGET_NAIVE_VS_ENGINE = 20.0
TARGET_VS_BYTES = 1.25


def engine_takes_max_in_flight(engine_root: Path) -> bool:
    """Whether the engine at engine_root accepts `max_in_flight` in a destination (a field of config.Destination)."""
    code = ("import dataclasses, shared.config as c\n"
            "print('max_in_flight' in {f.name for f in dataclasses.fields(c.Destination)})")
    env = {**os.environ, "PYTHONPATH": str(engine_root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=engine_root, env=env, capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"cannot read the destination fields of {engine_root}: {out.stderr.strip()[-500:]}")
    return out.stdout.strip() == "True"


def bytes_time_s(body_bytes: int | None, bandwidth_mbit: float | None) -> float | None:
    """Seconds the bytes alone need on the link; None without a bandwidth cap or a byte count."""
    if not bandwidth_mbit or body_bytes is None:
        return None
    return body_bytes * 8 / (bandwidth_mbit * 1e6)


def measure_variants(run: Callable[[int | None], dict[str, Any]], takes_max_in_flight: bool, standard: dict[str, Any],
                     log: Callable[[str], None], tag: str) -> dict[str, Any]:
    """The engine once per max_in_flight in IN_FLIGHT (run(value) runs it with that destination field). Without the
    field the standard run is the single sender, and the others are not built."""
    out: dict[str, Any] = {}
    for n in IN_FLIGHT:
        if not takes_max_in_flight:
            out[str(n)] = standard if n == 1 else None
            continue
        e = run(n)
        out[str(n)] = e
        log(f"{tag} engine, max_in_flight {n}: {e['wall_s']:7.2f} s, CPU {e['cpu_s']:.2f} s, {e['requests']} requests, "
            f"status {e['status']}, list holds {e['list_count']:,}")
    return out


def summary(row: dict[str, Any], bandwidth_mbit: float | None) -> dict[str, Any]:
    """Per variant: end to end, naive / it, and it / the bytes' time."""
    naive = row.get("naive", {}).get("wall_s")
    out: dict[str, Any] = {"naive_s": naive, "variants": {}}
    for key, e in row["latency"].items():
        if e is None:
            out["variants"][key] = None
            continue
        need = bytes_time_s(e["sent_bytes"], bandwidth_mbit)
        out["variants"][key] = {"wall_s": e["wall_s"], "cpu_s": e["cpu_s"], "requests": e["requests"],
                                "imports": e["imports"], "bytes_s": need,
                                "naive_vs": naive / e["wall_s"] if naive else None,
                                "vs_bytes": e["wall_s"] / need if need else None}
    return out


def render(rows: Sequence[dict[str, Any]], latency: float, bandwidth_mbit: float | None,
           label: Callable[[int], str]) -> str:
    link = f"{bandwidth_mbit:g} Mbit/s" if bandwidth_mbit else "no bandwidth cap"
    lines = [f"latency table: {latency:g} s before every answer, request bodies at {link}", "",
             "| profiles | variant | end to end, s | engine CPU, s | requests | naive / it | the bytes alone need, s "
             "| it / the bytes' time |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["latency_summary"]
        naive = s["naive_s"]
        lines.append(f"| {label(row['profiles'])} | naive (1,000 a request, sequential) | "
                     + (f"{naive:.2f} | - | {row['naive']['requests']:,} | 1.0x | - | - |" if naive else
                        "not run | - | - | - | - | - |"))
        for key, v in s["variants"].items():
            name = "single sender" if key == "1" else f"max_in_flight {key}"
            if v is None:
                lines.append(f"| {label(row['profiles'])} | {name} | not built | | | | | |")
                continue
            requests = f"{v['requests']}" + (f" + {v['imports']} import(s)" if v["imports"] else "")
            cells = [label(row["profiles"]), name, f"{v['wall_s']:.2f}", f"{v['cpu_s']:.2f}", requests,
                     f"{v['naive_vs']:.1f}x" if v["naive_vs"] else "-", f"{v['bytes_s']:.2f}" if v["bytes_s"] else "-",
                     f"{v['vs_bytes']:.2f}x" if v["vs_bytes"] else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], latency: float, bandwidth_mbit: float | None) -> list[dict[str, Any]]:
    """Issue 16's real-latency targets at 1M, for the best variant built: >= 20x faster than naive, and within 1.25x
    of the bytes' time."""
    m1 = next((r for r in rows if r["profiles"] == 1_000_000), None)
    where = f"at {latency:g} s" + (f" and {bandwidth_mbit:g} Mbit/s" if bandwidth_mbit else "")
    names = (f"1M {where} >= {TARGET_NAIVE_VS_ENGINE:g}x faster than naive (best variant)",
             f"1M {where} within {TARGET_VS_BYTES}x of the bytes' time (best variant)")
    if m1 is None:
        return [{"target": n, "measured": "1M not run", "result": "n/a"} for n in names]
    built = {k: v for k, v in m1["latency_summary"]["variants"].items() if v is not None}
    best_key = min(built, key=lambda k: built[k]["wall_s"])
    best = built[best_key]
    name = "single sender" if best_key == "1" else f"max_in_flight {best_key}"
    out = []
    ratio = best["naive_vs"]
    out.append({"target": names[0], "measured": f"{ratio:.1f}x ({name})" if ratio else "naive not run",
                "result": "n/a" if ratio is None else "PASS" if ratio >= TARGET_NAIVE_VS_ENGINE else "MISS"})
    ratio = best["vs_bytes"]
    out.append({"target": names[1], "measured": f"{ratio:.2f}x ({name})" if ratio else "no bandwidth cap",
                "result": "n/a" if ratio is None else "PASS" if ratio <= TARGET_VS_BYTES else "MISS"})
    return out
