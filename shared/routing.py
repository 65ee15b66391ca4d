"""Which destinations an export belongs to: the rule the blob trigger runs destinations by, and the HTTP door checks a
named source against."""

from __future__ import annotations

from . import sources
from .config import Config
from .storage import ObjectStore


def destinations_for_blob(exports: ObjectStore, config: Config, key: str) -> list[str]:
    """Which enabled destinations a new blob runs: a model.json runs every destination whose segments it holds; a plain
    file under <destination name>/ runs that destination; anything else runs nothing. Raises SourceError (or its
    ExportIncomplete) when a model.json cannot be read."""
    if key.endswith("model.json"):
        held = set(sources.segment_names(exports, key))  # model.json alone: a broken entity fails only its own
        return [d.name for d in config.destinations.values() if d.enabled and held & set(d.segments)]
    head = key.split("/", 1)[0]
    if "/" in key and head in config.destinations and not key.endswith("/"):
        return [head] if config.destinations[head].enabled else []
    return []
