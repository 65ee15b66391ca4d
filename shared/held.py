"""What the product holds in one destination's list: its snapshot plus what runs recorded as sent since.

SendGrid accepts a run's contacts request by request. Each accepted request (or import file) is recorded at the
checkpoint that passes it, as a small gzip of its emails (a "part", `state.sent_key`), written before the checkpoint
is saved. So whatever becomes of the run (failed on a 403, refused by the guard rail, killed, superseded), erasure and
purge still find every contact it put in SendGrid: the destination holds `snapshot + parts`.

Parts are folded into the snapshot (snapshot := snapshot + parts, then the parts are deleted) under the destination's
lease: by a run when it ends, and by a mirror run's removal step for every run that is not open any more. Parts of
an open run (sending, or waiting to be resumed) stay parts until that run ends; a mirror diff leaves them alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass

from . import delta, snapshots
from .state import OPEN_STATUSES, StateStore


@dataclass(frozen=True)
class Held:
    """One destination's list, as the product holds it."""

    state: StateStore
    destination: str
    list_id: str

    @property
    def snapshot_key(self) -> str:
        return self.state.snapshot_key(self.destination, self.list_id)

    @property
    def fingerprints_key(self) -> str:
        return self.state.fingerprints_key(self.destination, self.list_id)

    # -- parts ---------------------------------------------------------------------------------------------------
    def record(self, run_id: str, done: int, emails: Iterable[str]) -> None:
        """Record emails SendGrid accepted in the request that moves `run_id`'s checkpoint to `done` (the same key
        when a resumed run sends that request again)."""
        snapshots.write_lines(self.state.store, self.state.sent_key(self.destination, self.list_id, run_id, done),
                              emails)

    def record_file(self, run_id: str, done: int, path: str) -> None:
        """`record` for emails already written as a gzip of lines (an import file's, see bulk.ImportFile)."""
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    yield block

        self.state.store.write_stream(self.state.sent_key(self.destination, self.list_id, run_id, done), chunks())

    def parts(self) -> dict[str, list[str]]:
        """Keys of the recorded parts by run id, in key order."""
        found: dict[str, list[str]] = {}
        prefix = self.state.sent_prefix(self.destination, self.list_id)
        for info in self.state.store.list(prefix):
            run_id = info.key[len(prefix) :].split("/", 1)[0]
            found.setdefault(run_id, []).append(info.key)
        return found

    def open_runs(self, but: str | None = None) -> set[str]:
        """Ids of the parts' runs that are still open (not final), except `but`."""
        open_ids = set()
        for run_id in self.parts():
            if run_id == but:
                continue
            record = self.state.peek_run(run_id)
            if record is not None and record.get("status") in OPEN_STATUSES:
                open_ids.add(run_id)
        return open_ids

    @contextlib.contextmanager
    def sorted_parts(self, keys: Iterable[str]) -> Iterator[Iterator[str]]:
        """The distinct emails of some parts, ascending (an external sort: bounded memory at any size)."""
        with snapshots.EmailSorter() as sorter:
            for key in keys:
                for block in snapshots.read_lines(self.state.store, key):
                    sorter.extend(block)
            yield sorter.sorted_unique()

    # -- the whole set -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def emails(self, *, runs: Container[str] | None = None) -> Iterator[Iterator[str]]:
        """snapshot + parts (of `runs` only, when given), ascending and distinct."""
        keys = [k for run_id, ks in self.parts().items() if runs is None or run_id in runs for k in ks]
        with self.sorted_parts(keys) as parted:
            yield snapshots.union_sorted(snapshots.read_snapshot(self.state.store, self.snapshot_key), parted)

    def fold(self, runs: Container[str] | None = None, *, extra: Iterable[str] | None = None,
             written_by: str | None = None) -> int:
        """snapshot := snapshot + parts of `runs` (all parts when None) + `extra` (ascending, distinct); the folded
        parts are deleted after the snapshot is written. Returns the snapshot's size. Caller holds the lease."""
        folded = [k for run_id, ks in self.parts().items() if runs is None or run_id in runs for k in ks]
        store = self.state.store
        with self.sorted_parts(folded) as parted:
            streams = [snapshots.read_snapshot(store, self.snapshot_key), parted]
            if extra is not None:
                streams.append(iter(extra))
            count = snapshots.write_snapshot(store, self.snapshot_key, snapshots.union_sorted(*streams),
                                             trusted=True, written_by=written_by)
        for key in folded:
            store.delete(key)
        return count

    def replace(self, runs: Container[str], emails: Iterable[str], *, written_by: str | None = None) -> int:
        """snapshot := `emails` (ascending, distinct); then the parts of `runs` are deleted (what they recorded is
        in `emails`). Caller holds the lease."""
        count = snapshots.write_snapshot(self.state.store, self.snapshot_key, emails, trusted=True,
                                         written_by=written_by)
        for run_id, keys in self.parts().items():
            if run_id in runs:
                for key in keys:
                    self.state.store.delete(key)
        return count

    def delete_parts(self, run_id: str) -> None:
        for key in self.parts().get(run_id, []):
            self.state.store.delete(key)

    def closed_runs(self, but: str | None = None) -> set[str]:
        """Ids of the parts' runs that are final (or whose record is gone), except `but`: safe to fold."""
        return {run_id for run_id in self.parts() if run_id != but} - self.open_runs(but)

    def holds(self, address: str) -> bool:
        """Whether the snapshot or any part names the address."""
        store = self.state.store
        if next((e for e in snapshots.read_snapshot(store, self.snapshot_key) if e >= address), None) == address:
            return True
        return any(address in block for keys in self.parts().values() for key in keys
                   for block in snapshots.read_lines(store, key))

    def forget(self, address: str) -> None:
        """Erasure: the address out of the snapshot and out of every part. Caller holds the lease."""
        store = self.state.store
        snapshots.filter_out(store, self.snapshot_key, address)
        delta.forget(store, self.fingerprints_key, address)
        for keys in self.parts().values():
            for key in keys:  # read twice rather than hold a part (an import's is up to 1,000,000 emails)
                if any(address in block for block in snapshots.read_lines(store, key)):
                    snapshots.write_lines(store, key, (e for b in snapshots.read_lines(store, key) for e in b
                                                       if e != address))

    def forget_content(self) -> None:
        """Forget what was sent for whom (a list purge: the next run sends everyone again)."""
        snapshots.delete_snapshot(self.state.store, self.fingerprints_key)

    def drop(self) -> None:
        """Forget everything held (a completed purge=contacts): snapshot, parts, what was sent for whom."""
        self.forget_content()
        snapshots.delete_snapshot(self.state.store, self.snapshot_key)
        for keys in self.parts().values():
            for key in keys:
                self.state.store.delete(key)
