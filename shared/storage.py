"""Object storage behind one small interface: a local folder, or a Blob Storage container (`blobstore.py`).

Sources read exports through it and the state store keeps runs, ledger, snapshots and leases in it. Keys are
'/'-separated relative paths; a key that could escape the store ('..', absolute, backslashes) is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeGuard
from urllib.parse import unquote, urlsplit

from .errors import LeaseUnavailable, StateError

log = logging.getLogger(__name__)
_KEY_PART = re.compile(r"^[^/\\\x00]+$")


class NotFound(StateError):
    """The key does not exist in the store."""


class PreconditionFailed(StateError):
    """A conditional write lost a race (the object changed, or already exists)."""


class LeaseLost(LeaseUnavailable):
    """A lease this process held is gone (another holder took it, or it went unrenewed too long to be trusted): the
    work stops at once and writes nothing more, since the new holder may be working on the same state."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: float  # Unix seconds


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _service_host(hostname: str) -> str:
    """acct.dfs.core.windows.net and acct.blob.core.windows.net name the same storage (Event Grid reports the
    endpoint the writer used, and model.json files name either)."""
    labels = hostname.lower().split(".")
    if len(labels) > 2 and labels[1] == "dfs":
        labels[1] = "blob"
    return ".".join(labels)


def url_endpoint(url: str) -> tuple[str, int, str] | None:
    """(host, port, unquoted path) of an http(s) URL, or None when it is not one. The dfs endpoint of an account
    counts as its blob endpoint; the query and fragment are left out."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return _service_host(parts.hostname), port or _DEFAULT_PORTS[parts.scheme.lower()], unquote(parts.path)


def key_below(path: str, prefix: str) -> str | None:
    """The store key of a URL path inside a store whose keys start after `prefix` ('/container/'), or None."""
    if not path.startswith(prefix):
        return None
    try:
        return check_key(path[len(prefix):])
    except StateError:
        return None


def check_key(key: str) -> str:
    """Refuse keys that could leave the store. Returns the key unchanged."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or not _KEY_PART.match(p) for p in parts):
        raise StateError(f"invalid storage key {key!r}: use a relative path of plain names separated by '/'")
    return key


class Lease(Protocol):
    seconds: float  # how long the lease lasts unrenewed (a blob lease: 15-60 s)

    def renew(self) -> None:
        """Extend the lease by its duration. LeaseUnavailable (LeaseLost) when another holder has it; StateError when
        storage cannot be reached (the lease may still be ours)."""


class ObjectStore(Protocol):
    """What sources and state need from storage. Implementations: LocalFolderStore, blobstore.BlobContainerStore."""

    label: str  # for messages: "folder /x/y" or "container exports"

    def open_read(self, key: str) -> BinaryIO:
        """A streaming, read-only binary file object. Raises NotFound. A store that keeps blob snapshots
        (SnapshotStore) also takes `snapshot=<time>`: that snapshot of the object, not the object."""

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object (small objects only), or None when it does not exist."""

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """The whole object and the ETag of exactly that content (for a later write_bytes(if_match=...)), or None."""

    def info(self, key: str) -> ObjectInfo | None: ...

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write atomically; returns the new ETag. if_match/if_none_match make it conditional (PreconditionFailed)."""

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        """Write a large object from chunks without holding it in memory; atomic on completion."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with prefix, in key order."""

    def delete(self, key: str) -> None:
        """Delete if present."""

    def lease(self, key: str, seconds: int = 60) -> contextlib.AbstractContextManager[Lease]:
        """Exclusive lease on key for a run; raises LeaseUnavailable at once when someone else holds it."""

    def key_for_url(self, url: str) -> str | None:
        """The key an absolute URL names inside this store, or None when it points elsewhere: another account,
        container or (for a folder) another origin than the one the folder stands for."""



class SnapshotStore(ObjectStore, Protocol):
    """A store that keeps blob snapshots (blobstore.BlobContainerStore): open_read also reads one of them."""

    reads_snapshots: bool

    def open_read(self, key: str, snapshot: str | None = None) -> BinaryIO: ...


def reads_snapshots(store: ObjectStore) -> TypeGuard[SnapshotStore]:
    """Whether the store keeps blob snapshots; a folder (LocalFolderStore) keeps one version of each file."""
    return bool(getattr(store, "reads_snapshots", False))


class _FileLease:
    def __init__(self, fd: int, seconds: float) -> None:
        self._fd, self.seconds = fd, float(seconds)

    def renew(self) -> None:  # a flock lasts until released or the process dies
        pass


class LocalFolderStore:
    """A folder on disk. Writes go to a temporary file and are renamed into place; leases are flock()s, so a killed
    process releases its lease at once. ETags are content hashes of size and modification time. A folder keeps one
    version of each file: it reads no blob snapshots (`reads_snapshots`)."""

    reads_snapshots = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.label = f"folder {self.root}"
        self._origin: tuple[str, int, str] | None = None  # (host, port, path prefix) the folder stands for

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @staticmethod
    def _etag(st: os.stat_result) -> str:
        return hashlib.blake2b(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode(), digest_size=8).hexdigest()

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{key} not found in {self.label}") from None

    def read_bytes(self, key: str) -> bytes | None:
        found = self.read_with_etag(key)
        return None if found is None else found[0]

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as fh:  # the ETag of the open file: writes replace it with a new inode
                return fh.read(), self._etag(os.fstat(fh.fileno()))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._path(key)):
            return None
        return ObjectInfo(key, st.st_size, self._etag(st), st.st_mtime)

    def _replace(self, key: str, write: Callable[[BinaryIO], object]) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return self._etag(path.stat())

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        if if_match is not None or if_none_match:
            with self._guard(key):
                current = self.info(key)
                if if_none_match and current is not None:
                    raise PreconditionFailed(f"{key} already exists in {self.label}")
                if if_match is not None and (current is None or current.etag != if_match):
                    raise PreconditionFailed(f"{key} changed in {self.label}")
                return self._replace(key, lambda fh: fh.write(data))
        return self._replace(key, lambda fh: fh.write(data))

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        def write(fh: BinaryIO) -> None:
            for chunk in chunks:
                fh.write(chunk)

        return self._replace(key, write)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        base = self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith(".tmp-") or fn.startswith(".lock-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, fn), base).replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            info = self.info(key)
            if info is not None:
                yield info

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def _guard(self, key: str) -> Iterator[None]:
        """A short blocking lock for conditional writes of one key."""
        lock = self.root / ".locks" / (hashlib.blake2b(key.encode(), digest_size=12).hexdigest() + ".cas")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lease(self, key: str, seconds: int = 60) -> Iterator[Lease]:
        check_key(key)
        lock = self.root / ".locks" / (hashlib.blake2b(key.encode(), digest_size=12).hexdigest() + ".lease")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseUnavailable(f"{key} is held by another run") from None
        try:
            yield _FileLease(fd, seconds)
        finally:
            os.close(fd)

    def key_for_url(self, url: str) -> str | None:
        """A folder holds a copy of one place in one storage container, and a URL maps into it by the rule
        BlobContainerStore applies to its own container: same host and port (blob or dfs endpoint), path under the
        folder's origin, the rest of the path is the key. The folder cannot know its origin, so the first URL whose
        path ends with the key of a file in the folder sets it (that path less the key); from then on every URL must
        share it (another host, account or container is refused) and need not name an existing file."""
        endpoint = url_endpoint(url)
        if endpoint is None:
            return None
        host, port, path = endpoint
        if self._origin is not None:
            o_host, o_port, prefix = self._origin
            return key_below(path, prefix) if (host, port) == (o_host, o_port) else None
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts)):
            key = "/".join(parts[i:])
            try:
                check_key(key)
            except StateError:
                continue
            if (self.root / key).is_file():
                self._origin = (host, port, "/" + "".join(p + "/" for p in parts[:i]))
                return key
        return None


class LeaseKeeper:
    """Holds a lease for work that outlasts it (runs, purges, erasure). A background thread renews it every quarter
    of its duration on its own clock, whatever the work is doing (reading, sending, waiting on SendGrid, polling).

    The work asks check() before each write and each request: it raises LeaseLost once a renewal was refused (another
    holder took the lease) or none succeeded for three quarters of the duration (storage unreachable: the lease may
    lapse before the next renewal could land), and the keeper stays lost. sleep() is time.sleep that ends at once
    with LeaseLost. Use it as a context manager: the thread starts on entry and stops on exit (before the lease is
    released)."""

    def __init__(self, lease: Lease, *, what: str = "the lease", clock: Callable[[], float] = time.monotonic) -> None:
        self._lease, self.what, self._clock = lease, what, clock
        self.seconds = float(lease.seconds)
        self.renew_every = self.seconds / 4
        self.trusted_for = self.seconds - self.renew_every  # unrenewed longer than this, the lease is not relied on
        self._renewed_at = clock()  # taken (or renewed) just before the keeper was made
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._lost_event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LeaseKeeper({self.what}, {self.seconds:.0f} s, {'lost' if self._lost else 'held'})"

    def __enter__(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._renew_loop, name="lease-keeper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing. A renewal in progress (storage slow) is not waited for long: the lease is released next."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    @property
    def lost(self) -> str | None:
        """Why the lease is lost, or None while it is held."""
        return self._lost

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still held (and renewed recently enough to be trusted)."""
        if self._lost is None:
            quiet = self._clock() - self._renewed_at
            if quiet > self.trusted_for:
                self._lose(f"not renewed for {quiet:.0f} s (storage unreachable?); a {self.seconds:.0f} s lease may "
                           "lapse before the next renewal")
        if self._lost is not None:
            raise LeaseLost(f"{self.what} was lost: {self._lost}; this process stopped without writing more")

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, raising LeaseLost as soon as the lease is lost (at the latest when it stops being
        trusted), and when it was lost already."""
        end = self._clock() + seconds
        while True:
            self.check()
            left = end - self._clock()
            if left <= 0:
                return
            trust_left = self._renewed_at + self.trusted_for - self._clock()
            self._lost_event.wait(min(left, max(trust_left, 0.01)))

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = why
                log.warning("%s lost: %s", self.what, why)
        self._lost_event.set()

    def _renew_loop(self) -> None:
        delay = self.renew_every
        while not self._stop.wait(delay):
            started = self._clock()
            try:
                self._lease.renew()
            except LeaseUnavailable as exc:  # another holder has it
                if not self._stop.is_set():  # (a renewal that ends after the work is over says nothing)
                    self._lose(f"renewing it failed ({exc})")
                return
            except Exception as exc:  # storage unreachable past its retry budget: the lease may still be ours
                if self._stop.is_set():
                    return
                if self._clock() - self._renewed_at > self.trusted_for:
                    self._lose(f"renewing it failed for too long ({exc})")
                    return
                log.warning("renewing %s failed (%s); trying again", self.what, exc)
                delay = min(self.renew_every, 1.0)
                continue
            with self._lock:
                self._renewed_at = max(self._renewed_at, started)
            delay = self.renew_every


class LeasedStore:
    """An ObjectStore whose writes and deletes first ask a LeaseKeeper whether the lease is still held (LeaseLost
    otherwise): a process whose lease lapsed cannot change state a new holder works on. A streamed write is checked
    again right before it is committed. Reads pass through."""

    def __init__(self, store: ObjectStore, keeper: LeaseKeeper) -> None:
        self.inner, self.keeper, self.label = store, keeper, store.label

    def __repr__(self) -> str:
        return f"LeasedStore({self.label})"

    def open_read(self, key: str) -> BinaryIO:
        return self.inner.open_read(key)

    def read_bytes(self, key: str) -> bytes | None:
        return self.inner.read_bytes(key)

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        return self.inner.read_with_etag(key)

    def info(self, key: str) -> ObjectInfo | None:
        return self.inner.info(key)

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        self.keeper.check()
        return self.inner.write_bytes(key, data, if_match=if_match, if_none_match=if_none_match)

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        self.keeper.check()
        return self.inner.write_stream(key, self._checked(chunks))

    def _checked(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        yield from chunks
        self.keeper.check()  # the last chunk is taken; the store commits next

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.keeper.check()
        self.inner.delete(key)

    def lease(self, key: str, seconds: int = 60) -> contextlib.AbstractContextManager[Lease]:
        return self.inner.lease(key, seconds)

    def key_for_url(self, url: str) -> str | None:
        return self.inner.key_for_url(url)


class HeldLease:
    """A lease that wait_for_lease has already taken: leave it by using it as a context manager (or __exit__)."""

    def __init__(self, cm: contextlib.AbstractContextManager[Lease], lease: Lease) -> None:
        self._cm, self._lease = cm, lease
        self.seconds = lease.seconds

    def renew(self) -> None:
        self._lease.renew()

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)


def wait_for_lease(store: ObjectStore, key: str, seconds: int, timeout: float, poll: float = 0.5) -> HeldLease:
    """Acquire a lease, waiting up to timeout seconds for the holder to finish."""
    end = time.monotonic() + timeout
    while True:
        cm = store.lease(key, seconds)
        try:
            return HeldLease(cm, cm.__enter__())
        except LeaseUnavailable:
            if time.monotonic() >= end:
                raise
            time.sleep(poll)
