"""The ObjectStore contract, on a local folder and on a Blob container (Azurite), plus each backend's own rules."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient, BlobServiceClient, ContainerClient

from shared.blobstore import (
    RETRY_BUDGET,
    STORAGE_ATTEMPTS,
    BlobContainerStore,
    blob_service_from_settings,
    container_store,
    from_connection_string,
)
from shared.errors import ConfigError, LeaseUnavailable, StateError
from shared.storage import (
    LeasedStore,
    LeaseKeeper,
    LeaseLost,
    LocalFolderStore,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    wait_for_lease,
)
from tests.storage_faults import StorageProxy

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture(params=["local", pytest.param("blob", marks=pytest.mark.azurite)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalFolderStore(tmp_path / "store")
    return BlobContainerStore(request.getfixturevalue("blob_container"))


def _mib_chunk(i: int) -> bytes:
    """1 MiB of deterministic bytes that differ per chunk (so a misplaced chunk changes the digest)."""
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (MiB // 32)


def _race(n: int, attempt: Callable[[int], object]) -> list[object]:
    """Run attempt(i) in n threads released together; each result is the return value or the exception."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = attempt(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- contract --------------------------------------------------------------------------------------------------------


def test_round_trip(store: ObjectStore) -> None:
    etag = store.write_bytes("a/b/data.csv", b"email\nx@example.com\n")
    assert store.read_bytes("a/b/data.csv") == b"email\nx@example.com\n"
    info = store.info("a/b/data.csv")
    assert info is not None and (info.key, info.size, info.etag) == ("a/b/data.csv", 20, etag)
    assert '"' not in etag
    with store.open_read("a/b/data.csv") as fh:
        assert fh.readline() == b"email\n"
        assert fh.read() == b"x@example.com\n"
    etag2 = store.write_bytes("a/b/data.csv", b"other")
    assert etag2 != etag and store.read_bytes("a/b/data.csv") == b"other"


def test_missing_objects(store: ObjectStore) -> None:
    assert store.read_bytes("nope/x") is None
    assert store.info("nope/x") is None
    with pytest.raises(NotFound):
        store.open_read("nope/x")


def test_empty_object(store: ObjectStore) -> None:
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    assert store.info("empty").size == 0  # type: ignore[union-attr]
    with store.open_read("empty") as fh:
        assert fh.read() == b""


def test_conditional_writes(store: ObjectStore) -> None:
    first = store.write_bytes("c", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.write_bytes("c", b"2", if_none_match=True)
    second = store.write_bytes("c", b"3", if_match=first)
    with pytest.raises(PreconditionFailed):
        store.write_bytes("c", b"4", if_match=first)  # stale ETag
    assert store.read_bytes("c") == b"3" and store.info("c").etag == second  # type: ignore[union-attr]
    with pytest.raises(PreconditionFailed):
        store.write_bytes("missing", b"5", if_match=second)
    assert store.read_bytes("missing") is None


def test_read_with_etag_gives_the_etag_of_that_content(store: ObjectStore) -> None:
    assert store.read_with_etag("v/missing") is None
    written = store.write_bytes("v/x", b"one")
    data, etag = store.read_with_etag("v/x")  # type: ignore[misc]
    assert (data, etag) == (b"one", written) and store.info("v/x").etag == etag  # type: ignore[union-attr]
    store.write_bytes("v/x", b"two", if_match=etag)  # the ETag read is the one a conditional write needs
    with pytest.raises(PreconditionFailed):
        store.write_bytes("v/x", b"three", if_match=etag)
    assert store.read_with_etag("v/x")[0] == b"two"  # type: ignore[index]


def test_conditional_writers_race(store: ObjectStore) -> None:
    for round_ in range(3):
        key = f"race/{round_}"
        created = _race(2, lambda i, key=key: store.write_bytes(key, f"new{i}".encode(), if_none_match=True))
        winners = [i for i, r in enumerate(created) if isinstance(r, str)]
        assert len(winners) == 1 and isinstance(created[1 - winners[0]], PreconditionFailed)
        assert store.read_bytes(key) == f"new{winners[0]}".encode()

        etag = created[winners[0]]
        updated = _race(2, lambda i, key=key, etag=etag: store.write_bytes(key, f"upd{i}".encode(), if_match=etag))
        winners = [i for i, r in enumerate(updated) if isinstance(r, str)]
        assert len(winners) == 1 and isinstance(updated[1 - winners[0]], PreconditionFailed)
        assert store.read_bytes(key) == f"upd{winners[0]}".encode()


def test_large_object_streams_in_bounded_memory(store: ObjectStore) -> None:
    """20 MiB in and out; neither side may hold the object (tracemalloc counts Python allocations, the SDK's too)."""
    n = 20
    tracemalloc.start()
    try:
        etag = store.write_stream("big/export.csv", (_mib_chunk(i) for i in range(n)))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest = hashlib.sha256()
        size = 0
        with store.open_read("big/export.csv") as fh:
            while piece := fh.read(64 * 1024):
                digest.update(piece)
                size += len(piece)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256(b"".join(_mib_chunk(i) for i in range(n))).hexdigest()
    assert (size, digest.hexdigest()) == (n * MiB, expected)
    assert store.info("big/export.csv").etag == etag  # type: ignore[union-attr]
    assert write_peak < 14 * MiB, f"write_stream held {write_peak / MiB:.1f} MiB"
    assert read_peak < 14 * MiB, f"open_read held {read_peak / MiB:.1f} MiB"


def test_open_read_seeks(store: ObjectStore) -> None:
    data = b"".join(_mib_chunk(i)[:1000] + bytes([i]) * 24 for i in range(50))
    store.write_bytes("seek", data)
    with store.open_read("seek") as fh:
        fh.seek(30_000)
        assert fh.read(100) == data[30_000:30_100]
        fh.seek(-10, os.SEEK_END)
        assert fh.read() == data[-10:]
        fh.seek(5)
        assert fh.tell() == 5 and fh.read(3) == data[5:8]


def test_write_stream_round_trip_and_atomicity(store: ObjectStore) -> None:
    pieces = [bytes([i % 251]) * (7_000 + i) for i in range(40)]
    store.write_stream("s/one", iter(pieces))
    assert store.read_bytes("s/one") == b"".join(pieces)

    store.write_stream("s/empty", iter(()))
    assert store.read_bytes("s/empty") == b""

    store.write_bytes("s/keep", b"old")

    def broken() -> Iterator[bytes]:
        yield b"x" * (5 * MiB)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        store.write_stream("s/keep", broken())
    with pytest.raises(RuntimeError):
        store.write_stream("s/never", broken())
    assert store.read_bytes("s/keep") == b"old"
    assert store.info("s/never") is None


def test_list_prefix_in_key_order(store: ObjectStore) -> None:
    keys = ["b/2", "a/sub/x", "a/10", "ab", "a/1", "a/2"]
    etags = {k: store.write_bytes(k, k.encode() * 3) for k in keys}
    assert [i.key for i in store.list("a/")] == ["a/1", "a/10", "a/2", "a/sub/x"]
    assert [i.key for i in store.list("a")] == ["a/1", "a/10", "a/2", "a/sub/x", "ab"]
    listed = list(store.list())
    assert [i.key for i in listed] == sorted(keys)
    assert all(i.etag == etags[i.key] and i.size == 3 * len(i.key) for i in listed)
    assert list(store.list("zzz/")) == []


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.write_bytes("d/x", b"1")
    store.delete("d/x")
    assert store.info("d/x") is None and store.read_bytes("d/x") is None
    store.delete("d/x")
    store.delete("never/was")


def test_lease_is_exclusive_across_threads(store: ObjectStore) -> None:
    held, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with store.lease("leases/dest", 15) as lease:
                held.set()
                done.wait(30)
                lease.renew()
        except BaseException as e:
            errors.append(e)
            held.set()

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    try:
        with pytest.raises(LeaseUnavailable), store.lease("leases/dest", 15):
            pass
        with store.lease("leases/other", 15):  # another key is independent
            pass
    finally:
        done.set()
        t.join()
    assert errors == []
    with store.lease("leases/dest", 15) as lease:  # released on exit
        lease.renew()


def test_lease_released_when_body_raises(store: ObjectStore) -> None:
    with pytest.raises(KeyError), store.lease("leases/x", 15):
        raise KeyError("boom")
    with store.lease("leases/x", 15):
        pass


BAD_KEYS = ["../x", "a/../../b", "/etc/passwd", "a//b", "a\\b", "", "./a", "a/", "a/\x00"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_traversal_keys_refused(store: ObjectStore, key: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.read_bytes(key),
        lambda: store.info(key),
        lambda: store.open_read(key),
        lambda: store.write_bytes(key, b"x"),
        lambda: store.write_stream(key, iter([b"x"])),
        lambda: store.delete(key),
        lambda: store.lease(key).__enter__(),
    ]
    for call in calls:
        with pytest.raises(StateError):
            call()
    assert list(store.list()) == []


# -- leases held by a process that dies -------------------------------------------------------------------------------

_HOLDER = """
import os, sys, time
sys.path.insert(0, {repo!r})
if sys.argv[1] == "local":
    from shared.storage import LocalFolderStore
    store = LocalFolderStore(sys.argv[2])
else:
    from shared.blobstore import from_connection_string
    store = from_connection_string(os.environ["TEST_BLOB_CONNECTION"], sys.argv[2])
held = store.lease("leases/dest", 15)
held.__enter__()
print("held", flush=True)
time.sleep(120)
"""


def _hold_in_subprocess(kind: str, where: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO)), kind, where],
                            stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def test_local_lease_dies_with_its_process(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    proc = _hold_in_subprocess("local", str(tmp_path))
    try:
        with pytest.raises(LeaseUnavailable), store.lease("leases/dest"):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with store.lease("leases/dest"):  # the flock went with the process
        pass


@pytest.mark.azurite
def test_blob_lease_outlives_a_killed_holder_until_it_lapses(azurite: Any, blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    proc = _hold_in_subprocess("blob", blob_container.container_name,
                               {"TEST_BLOB_CONNECTION": azurite.connection_string})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(LeaseUnavailable), store.lease("leases/dest"):  # a blob lease lasts its duration
        pass


@pytest.mark.azurite
@pytest.mark.slow
def test_blob_lease_of_a_killed_holder_lapses(azurite: Any, blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    proc = _hold_in_subprocess("blob", blob_container.container_name,
                               {"TEST_BLOB_CONNECTION": azurite.connection_string})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cm = wait_for_lease(store, "leases/dest", 15, timeout=40, poll=0.5)  # 15 s lease: lapses within ~15 s
    cm.__exit__(None, None, None)


# -- lease keeper ------------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _RecordingLease:
    """A lease whose renewals are recorded (and can be made to fail): the keeper's own logic, apart from storage."""

    def __init__(self, seconds: float, fail: Exception | None = None) -> None:
        self.seconds, self.fail = seconds, fail
        self.renewals = threading.Semaphore(0)

    def renew(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.renewals.release()


def test_keeper_renews_on_its_own_clock_while_the_work_does_nothing() -> None:
    lease = _RecordingLease(0.4)  # renewed every 0.1 s
    with LeaseKeeper(lease) as keeper:
        for _ in range(3):  # three renewals while this thread only waits
            assert lease.renewals.acquire(timeout=30), "the keeper stopped renewing"
        keeper.check()
    assert keeper.lost is None


def test_keeper_stops_trusting_a_lease_it_cannot_renew() -> None:
    """Storage unreachable: the lease may lapse before a renewal lands, so past three quarters of its duration
    without one the work stops, and stays stopped even if a renewal gets through later."""
    clock = _Clock()
    keeper = LeaseKeeper(_RecordingLease(60, fail=StateError("HTTP 503")), clock=clock)  # never started: no renewals
    clock.now += 44.9
    keeper.check()  # still inside the 45 s it is trusted for
    clock.now += 0.2
    with pytest.raises(LeaseLost, match="not renewed for 45 s"):
        keeper.check()
    with pytest.raises(LeaseLost):
        keeper.sleep(1)
    assert keeper.lost is not None


def test_a_refused_renewal_loses_the_lease_and_ends_a_wait_at_once() -> None:
    lease = _RecordingLease(0.4, fail=LeaseLost("leases/d was taken over (LeaseIdMismatchWithLeaseOperation)"))
    with LeaseKeeper(lease) as keeper, pytest.raises(LeaseLost, match="taken over") as lost:
        keeper.sleep(3600)  # a long wait on SendGrid ends when the renewal is refused, not when it is over
    assert "stopped without writing" in str(lost.value)


@pytest.mark.azurite
def test_keeper_notices_a_blob_lease_taken_over(blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    with store.lease("leases/d", 15) as lease, LeaseKeeper(lease) as keeper:
        keeper.check()
        BlobLeaseClient(blob_container.get_blob_client("leases/d")).break_lease(lease_break_period=0)
        with store.lease("leases/d", 15), pytest.raises(LeaseLost, match="was lost"):  # another holder has it now
            keeper.sleep(60)  # the next renewal (within 3.75 s) is refused
    assert keeper.lost is not None


def test_leased_store_writes_only_while_the_lease_is_held(store: ObjectStore) -> None:
    clock = _Clock()
    keeper = LeaseKeeper(_RecordingLease(60), clock=clock)
    leased = LeasedStore(store, keeper)
    leased.write_bytes("l/a", b"1")
    leased.write_stream("l/b", iter([b"2"]))

    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        clock.now += 3600  # the lease stops being trusted while the object is being written
        yield b"y" * 1000

    with pytest.raises(LeaseLost):
        leased.write_stream("l/c", chunks())
    assert store.info("l/c") is None  # checked again before the commit: nothing was written
    for write in (lambda: leased.write_bytes("l/a", b"3"), lambda: leased.delete("l/a"),
                  lambda: leased.write_stream("l/d", iter([b"4"]))):
        with pytest.raises(LeaseLost):
            write()
    assert leased.read_bytes("l/a") == b"1" and [i.key for i in leased.list("l/")] == ["l/a", "l/b"]


# -- the storage retry budget ------------------------------------------------------------------------------------------


@pytest.mark.azurite
@pytest.mark.slow
def test_a_storage_call_retries_within_the_stated_budget(azurite: Any, blob_container: ContainerClient) -> None:
    """A call gets STORAGE_ATTEMPTS attempts (the waits between them add up to about 17 s), then fails with an error
    that states the budget."""
    proxy = StorageProxy(azurite.blob_url)
    try:
        store = from_connection_string(proxy.connection_string, blob_container.container_name)
        proxy.outage(requests=10 * STORAGE_ATTEMPTS)
        with pytest.raises(StateError) as failed:
            store.write_bytes("budget/no", b"2")
        assert (proxy.refused, proxy.forwarded) == (STORAGE_ATTEMPTS, 0)  # that many attempts, not one more
        assert "HTTP 503 ServerBusy" in str(failed.value) and RETRY_BUDGET in str(failed.value)
    finally:
        proxy.close()


# -- key_for_url -------------------------------------------------------------------------------------------------------


def test_local_key_for_url(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.write_bytes("exports/seg one/part.csv", b"x")
    url = "https://acct.blob.core.windows.net/cdm/exports/seg%20one/part.csv?sv=2024&sig=abc"
    assert LocalFolderStore(tmp_path).key_for_url("https://acct.blob.core.windows.net/cdm/exports/missing.csv") is None
    assert store.key_for_url(url) == "exports/seg one/part.csv"  # the folder stands for https://acct.../cdm/ now
    assert store.key_for_url("https://acct.blob.core.windows.net/cdm/exports/missing.csv") == "exports/missing.csv"
    for other in ["https://evil.blob.core.windows.net/cdm/exports/seg%20one/part.csv",  # another account
                  "https://acct.blob.core.windows.net/other/exports/seg%20one/part.csv",  # another container
                  "http://acct.blob.core.windows.net/cdm/exports/seg%20one/part.csv",  # another port
                  "ftp://acct.blob.core.windows.net/cdm/exports/seg%20one/part.csv"]:
        assert store.key_for_url(other) is None, other
    dfs = "https://ACCT.dfs.core.windows.net/cdm/exports/seg%20one/part.csv"  # the same account's dfs endpoint
    assert store.key_for_url(dfs) == "exports/seg one/part.csv"


@pytest.mark.azurite
def test_blob_key_for_url(azurite: Any, blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    base = f"{azurite.blob_url}/{blob_container.container_name}"
    url = f"{base}/exports/seg%20one/part%2D1.csv?sv=2024&sig=secret"
    assert store.key_for_url(url) == "exports/seg one/part-1.csv"
    assert store.key_for_url(f"{base}/a.csv") == "a.csv"
    host_port = azurite.blob_url.split("/")[2]
    other_port = int(host_port.rsplit(":", 1)[1]) + 1
    for url in [
        f"{azurite.blob_url}/othercontainer/a.csv",  # another container
        f"{azurite.blob_url}/{blob_container.container_name}x/a.csv",  # container name prefix only
        f"http://127.0.0.1:{other_port}/devstoreaccount1/{blob_container.container_name}/a.csv",  # another port
        f"http://{host_port}/otheraccount/{blob_container.container_name}/a.csv",  # another account
        f"http://localhost.example/devstoreaccount1/{blob_container.container_name}/a.csv",  # another host
        f"{base}/",  # the container itself
        f"{base}/a/../../b.csv",
        f"ftp://{host_port}/devstoreaccount1/{blob_container.container_name}/a.csv",
        "not a url",
    ]:
        assert store.key_for_url(url) is None, url


def test_blob_key_for_url_account_host_styles() -> None:
    """Host-style Azure URLs: the account is the host; Event Grid may report the dfs endpoint for ADLS writes."""
    service = BlobServiceClient("https://acct.blob.core.windows.net")
    store = BlobContainerStore(service.get_container_client("exports"))
    assert store.key_for_url("https://acct.blob.core.windows.net/exports/x/y.csv") == "x/y.csv"
    assert store.key_for_url("https://ACCT.dfs.core.windows.net/exports/x/y.csv?x=1") == "x/y.csv"
    assert store.key_for_url("https://other.blob.core.windows.net/exports/x/y.csv") is None
    assert store.key_for_url("https://acct.blob.core.windows.net/imports/x/y.csv") is None
    assert store.key_for_url("http://acct.blob.core.windows.net:8080/exports/x/y.csv") is None


# -- Blob specifics ----------------------------------------------------------------------------------------------------


@pytest.mark.azurite
def test_blob_read_fails_when_object_changes_mid_read(blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container, read_chunk=64 * 1024)
    store.write_bytes("v", b"a" * 300_000)
    with store.open_read("v") as fh:
        assert fh.read(100_000) == b"a" * 100_000
        store.write_bytes("v", b"b" * 300_000)
        with pytest.raises(PreconditionFailed):
            fh.read()


@pytest.mark.azurite
def test_blob_write_stream_stages_many_blocks(blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container, block_size=10_000)
    pieces = [bytes([i]) * 3_333 for i in range(30)]
    store.write_stream("blocks", iter(pieces))
    assert len(blob_container.get_blob_client("blocks").get_block_list("committed")[0]) == 10
    assert store.read_bytes("blocks") == b"".join(pieces)


@pytest.mark.azurite
def test_blob_folder_markers_are_not_objects(blob_container: ContainerClient) -> None:
    blob_container.upload_blob("exports", b"", metadata={"hdi_isfolder": "true"})
    store = BlobContainerStore(blob_container)
    store.write_bytes("exports/a.csv", b"x")
    assert [i.key for i in store.list()] == ["exports/a.csv"]
    assert store.info("exports") is None
    with pytest.raises(NotFound):
        store.open_read("exports")


@pytest.mark.azurite
def test_blob_missing_container_is_an_error_not_absence(azurite: Any) -> None:
    store = from_connection_string(azurite.connection_string, "no-such-container")
    for call in (lambda: store.read_bytes("x"), lambda: store.info("x"), lambda: list(store.list()),
                 lambda: store.write_bytes("x", b"1")):
        with pytest.raises(StateError, match="does not exist"):
            call()


@pytest.mark.azurite
def test_blob_lease_object_is_a_lock_and_renew_notices_loss(blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    with store.lease("leases/d", 300) as lease:  # clamped to the service's 60 s maximum
        props = blob_container.get_blob_client("leases/d").get_blob_properties()
        assert props.lease.duration == "fixed" and props.lease.state == "leased"
        with pytest.raises(LeaseUnavailable):
            store.write_bytes("leases/d", b"data")
        BlobLeaseClient(blob_container.get_blob_client("leases/d")).break_lease(lease_break_period=0)
        with store.lease("leases/d", 15), pytest.raises(LeaseUnavailable):  # someone else took it over
            lease.renew()
    with store.lease("leases/d", 15):
        pass


@pytest.mark.azurite
def test_container_store_create(azurite: Any) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    name = f"c{uuid.uuid4().hex}"
    try:
        store = container_store(service, name, create=True)
        container_store(service, name, create=True)  # exists: fine
        store.write_bytes("x", b"1")
        assert store.read_bytes("x") == b"1"
        assert store.label.endswith(f"devstoreaccount1/{name}")
    finally:
        service.delete_container(name)


# -- connection settings -----------------------------------------------------------------------------------------------

_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def test_settings_connection_string() -> None:
    cs = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={_KEY};EndpointSuffix=core.windows.net"
    service = blob_service_from_settings("ExportStorage", {"ExportStorage": cs})
    assert service.account_name == "acct" and service.url.startswith("https://acct.blob.core.windows.net")


def test_settings_identity_based(monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.identity

    made: list[dict[str, object]] = []

    class Recorder:
        def __init__(self, **kwargs: object) -> None:
            made.append(kwargs)

        def get_token(self, *scopes: str, **kwargs: object) -> None:
            raise AssertionError("no token may be requested while building the client")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", Recorder)
    env = {"ExportStorage__blobServiceUri": "https://acct.blob.core.windows.net"}
    service = blob_service_from_settings("ExportStorage", env)
    assert service.account_name == "acct" and isinstance(service.credential, Recorder) and made == [{}]
    blob_service_from_settings("ExportStorage", {**env, "ExportStorage__credential": "managedidentity",
                                                 "ExportStorage__clientId": "0000-1111"})
    assert made[-1] == {"managed_identity_client_id": "0000-1111"}
    with pytest.raises(ConfigError, match="without ExportStorage__credential"):  # the binding would ignore the id
        blob_service_from_settings("ExportStorage", {**env, "ExportStorage__clientId": "0000-1111"})
    service = blob_service_from_settings("AzureWebJobsStorage", {"AzureWebJobsStorage__accountName": "hostacct"})
    assert service.url.startswith("https://hostacct.blob.core.windows.net")


def test_settings_missing_or_invalid() -> None:
    with pytest.raises(ConfigError, match=r"ExportStorage__blobServiceUri") as info:
        blob_service_from_settings("ExportStorage", {"Other": "x"})
    assert "ExportStorage__clientId" in str(info.value)
    with pytest.raises(ConfigError) as info:
        blob_service_from_settings("S", {"S": f"AccountKey={_KEY};nonsense"})
    assert _KEY not in str(info.value) and "S" in str(info.value)
    with pytest.raises(ConfigError, match="Key Vault"):
        blob_service_from_settings("S", {"S": "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/x)"})
