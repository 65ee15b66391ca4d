"""Object storage behind one small interface: a local folder, or a Blob Storage container (`blobstore.py`).

Sources read exports through it and the state store keeps runs, ledger, snapshots and leases in it. Keys are
'/'-separated relative paths; a key that could escape the store ('..', absolute, backslashes) is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from .errors import LeaseUnavailable, StateError

_KEY_PART = re.compile(r"^[^/\\\x00]+$")


class NotFound(StateError):
    """The key does not exist in the store."""


class PreconditionFailed(StateError):
    """A conditional write lost a race (the object changed, or already exists)."""


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
    def renew(self) -> None: ...


class ObjectStore(Protocol):
    """What sources and state need from storage. Implementations: LocalFolderStore, blobstore.BlobContainerStore."""

    label: str  # for messages: "folder /x/y" or "container exports"

    def open_read(self, key: str) -> BinaryIO:
        """A streaming, read-only binary file object. Raises NotFound. A store that keeps blob snapshots
        (`reads_snapshots = True`) also takes `snapshot=<time>`: that snapshot of the object, not the object."""

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object (small objects only), or None when it does not exist."""

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


class _FileLease:
    def __init__(self, fd: int) -> None:
        self._fd = fd

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
        try:
            return self._path(key).read_bytes()
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

    def _replace(self, key: str, write: callable) -> str:  # type: ignore[valid-type]
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
            yield _FileLease(fd)
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


LEASE_RENEW_SECONDS = 15.0  # well inside a 60 s blob lease


class LeaseKeeper:
    """Renews a lease at most every LEASE_RENEW_SECONDS however often it is called (per chunk, per checkpoint):
    work that outlasts a blob lease (at most 60 s) keeps its destination."""

    def __init__(self, lease: Lease) -> None:
        self._lease, self._last = lease, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= LEASE_RENEW_SECONDS:
            self._last = now
            self._lease.renew()


class HeldLease:
    """A lease that wait_for_lease has already taken: leave it by using it as a context manager (or __exit__)."""

    def __init__(self, cm: contextlib.AbstractContextManager[Lease], lease: Lease) -> None:
        self._cm, self._lease = cm, lease

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
