"""Generated Customer Insights exports for the benchmark, cached under <bench dir>/exports/ keyed by size and seed."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from sandbox import samplegen

from .baselines import export_layout

ROWS_PER_PARTITION = 500_000  # exports above 2M rows get more than the minimum of 4 partitions
MIN_PARTITIONS = 4
CACHE_VERSION = 1  # bump when the generator's arguments here change, so stale caches are not reused


@dataclass(frozen=True)
class Export:
    profiles: int
    seed: int
    root: Path  # plays the storage container
    model_json: Path
    partitions: tuple[Path, ...]
    rows: int
    valid_distinct: int
    bad_rows: int
    duplicate_rows: int

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.partitions)


def partitions_for(profiles: int) -> int:
    return max(MIN_PARTITIONS, math.ceil(profiles / ROWS_PER_PARTITION))


def ensure_export(bench_dir: Path, profiles: int, seed: int) -> tuple[Export, bool]:
    """The cached export of `profiles` rows for `seed`, generated first when missing; (export, generated now)."""
    root = bench_dir / "exports" / f"p{profiles}-s{seed}-v{CACHE_VERSION}"
    marker = root / "export-info.json"
    generated = False
    if not marker.is_file():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        info = samplegen.write_cdm_export(tmp, profiles, seed=seed, partitions=partitions_for(profiles))
        (tmp / marker.name).write_text(json.dumps(dataclasses.asdict(info), indent=2), encoding="utf-8")
        tmp.rename(root)  # complete or absent: an interrupted generation is never taken for a cached one
        generated = True
    info = json.loads(marker.read_text(encoding="utf-8"))
    model_json = root / info["model_key"]
    _, files = export_layout(model_json)
    return Export(profiles, seed, root, model_json, tuple(files), info["rows"], info["valid_distinct"],
                  info["bad_rows"], info["duplicate_rows"]), generated


def warm(export: Export) -> None:
    """Read every partition once so that every measured run finds them in the page cache."""
    for path in export.partitions:
        with open(path, "rb") as fh:
            while fh.read(8 << 20):
                pass
