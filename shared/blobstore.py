"""The `ObjectStore` interface on a Blob Storage container (azure-storage-blob), the Azure twin of LocalFolderStore.

Reads stream in ranged GETs pinned to the ETag seen at open, so a blob replaced mid-read fails instead of mixing two
versions. Large writes stage blocks and commit them at the end, so nothing big sits in memory and readers never see
a half-written object. Leases are blob leases (15-60 s, renewable) on the object at the lease key, which serves only
as a lock: a killed holder's lease lapses when its duration runs out.

Every call retries within one storage retry budget (STORAGE_ATTEMPTS, retry_policy); an error after it says so.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, BinaryIO, TypedDict

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobLeaseClient,
    BlobServiceClient,
    ContainerClient,
    ExponentialRetry,
)

from . import connections
from .errors import ConfigError, LeaseUnavailable, StateError
from .storage import Lease, LeaseLost, NotFound, ObjectInfo, PreconditionFailed, check_key, key_below, url_endpoint

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# One ranged GET of open_read. azure-storage-blob 12.x collects a response with list(stream), and the stream's len()
# is its byte count, so every download briefly allocates a list of 8 bytes per byte of the range (a 4 MiB range costs
# 36 MiB). 1 MiB ranges keep a reader near 9 MiB at a few ms of latency per MiB.
READ_CHUNK_BYTES = 1024 * 1024
BLOCK_BYTES = 4 * 1024 * 1024  # one staged block in write_stream (50,000 blocks a blob: 200 GB)
LEASE_MIN_SECONDS, LEASE_MAX_SECONDS = 15, 60  # what Blob Storage accepts for a finite lease
_SAS_SIG = re.compile(r"(sig|se|sv|sp|skoid|sktid)=[^&\s]+", re.IGNORECASE)


# The storage retry budget of every call (state and exports): STORAGE_ATTEMPTS attempts of a call that meets 5xx,
# 408, timeouts or refused connections, waiting 1 + 2**n s (+-1 s of jitter) before attempt n + 1: 3, 5 and 9 s, so a
# call gives up after about 17 s (14-20 s) of waiting plus its attempts. The SDK default (15, 18 and 24 s: over a
# minute) is too long for a run with a deadline or an HTTP answer due in 230 s. A run whose state cannot be written
# within the budget stops `interrupted` (resumable) and the timer resumes it from its checkpoint.
STORAGE_ATTEMPTS = 4
_BACKOFF_INITIAL, _BACKOFF_BASE, _BACKOFF_JITTER = 1, 2, 1
STORAGE_RETRY_WAIT_S = sum(_BACKOFF_INITIAL + _BACKOFF_BASE**n for n in range(1, STORAGE_ATTEMPTS))
RETRY_BUDGET = f"{STORAGE_ATTEMPTS} attempts over about {STORAGE_RETRY_WAIT_S} s, the storage retry budget"


def retry_policy() -> ExponentialRetry:
    """The storage retry budget as the SDK's policy. Every kind of failure (status, connection, read) counts against
    the same STORAGE_ATTEMPTS (the SDK's own counters would allow one more of some kinds than of others)."""
    retries = STORAGE_ATTEMPTS - 1
    return ExponentialRetry(initial_backoff=_BACKOFF_INITIAL, increment_base=_BACKOFF_BASE,
                            random_jitter_range=_BACKOFF_JITTER, retry_total=retries, retry_connect=retries,
                            retry_read=retries, retry_status=retries)


def _etag(raw: str | None) -> str:
    """ETags without their quotes, the same form LocalFolderStore hands out."""
    return (raw or "").strip('"')


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _code(e: HttpResponseError) -> str:
    """The service's error code ('ConditionNotMet'); the SDK gives an enum for known codes, a str otherwise. The
    storage SDK sets `error_code` on the errors it raises; azure-core's class does not declare it."""
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _retried(e: AzureError) -> bool:
    """Whether the SDK retried the call within the budget before this error (see retry_policy)."""
    if isinstance(e, HttpResponseError):
        return e.status_code is not None and (e.status_code == 408 or e.status_code >= 500)
    return True  # no answer at all: refused or dropped connections, timeouts


def _describe(e: AzureError) -> str:
    """A short, secret-free account of an SDK error (no response bodies, no URLs with SAS tokens), naming the retry
    budget when the call was retried."""
    if isinstance(e, HttpResponseError):
        text = f"HTTP {e.status_code} {_code(e) or e.reason or ''}".strip()
    else:
        first = str(e).splitlines()[0] if str(e) else ""
        text = f"{type(e).__name__}: {_SAS_SIG.sub(_redact, first)}"[:300]
    return f"{text} (gave up after {RETRY_BUDGET})" if _retried(e) else text


def _redact(m: re.Match[str]) -> str:
    return f"{m.group(1)}=REDACTED"


class _Condition(TypedDict, total=False):
    """The SDK's keyword arguments of a conditional call: an ETag with IfNotModified, or IfMissing alone."""

    etag: str
    match_condition: MatchConditions


def _is_folder(metadata: Mapping[str, str] | None) -> bool:
    """Hierarchical-namespace (ADLS Gen2) accounts show directories as empty blobs marked hdi_isfolder."""
    return metadata is not None and str(metadata.get("hdi_isfolder", "")).lower() == "true"


class _BlobReader(io.RawIOBase):
    """A seekable read-only view of one blob version, fetched in ranged GETs of `chunk` bytes."""

    def __init__(self, blob: BlobClient, key: str, size: int, etag: str | None, chunk: int, label: str) -> None:
        super().__init__()
        self.name, self.etag, self.size = key, etag, size
        self._blob, self._chunk, self._label = blob, chunk, label
        self._pos = 0
        self._buf: bytes = b""
        self._buf_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def _fetch(self) -> None:
        length = min(self._chunk, self.size - self._pos)
        self._buf = b""  # drop the old chunk before the new one arrives
        pinned: _Condition = {}  # a snapshot cannot change: no condition
        if self.etag is not None:
            pinned = {"etag": _quoted(self.etag), "match_condition": MatchConditions.IfNotModified}
        try:
            data = self._blob.download_blob(offset=self._pos, length=length, max_concurrency=1, **pinned).readall()
        except ResourceNotFoundError:
            raise NotFound(f"{self.name} was deleted from {self._label} while being read") from None
        except HttpResponseError as e:
            if e.status_code == 412:
                raise PreconditionFailed(f"{self.name} changed in {self._label} while being read") from None
            raise StateError(f"reading {self.name!r} in {self._label} failed: {_describe(e)}") from None
        except AzureError as e:
            raise StateError(f"reading {self.name!r} in {self._label} failed: {_describe(e)}") from None
        if not data:
            raise StateError(f"reading {self.name!r} in {self._label}: no data at offset {self._pos} of {self.size}")
        self._buf, self._buf_start = data, self._pos

    def readinto(self, b: WriteableBuffer) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        with memoryview(b) as given, given.cast("B") as out:
            if self._pos >= self.size or not len(out):
                return 0
            if not self._buf_start <= self._pos < self._buf_start + len(self._buf):
                self._fetch()
            i = self._pos - self._buf_start
            n = min(len(out), len(self._buf) - i)
            out[:n] = memoryview(self._buf)[i : i + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._buf = b""
        super().close()


class _BlobLease:
    def __init__(self, client: BlobLeaseClient, key: str, label: str, seconds: int) -> None:
        self._client, self._key, self._label, self.seconds = client, key, label, float(seconds)

    @property
    def id(self) -> str:
        return str(self._client.id)

    def renew(self) -> None:
        """Extend the lease by its duration (also once it lapsed, if nobody leased the key since). LeaseLost when
        another holder took it or it was broken; StateError when storage cannot be reached."""
        try:
            self._client.renew()
        except HttpResponseError as e:
            if e.status_code in (404, 409, 412):
                raise LeaseLost(f"the lease on {self._key} in {self._label} was lost ({_code(e)})") from None
            raise StateError(f"renewing the lease on {self._key!r} in {self._label} failed: {_describe(e)}") from None
        except AzureError as e:
            raise StateError(f"renewing the lease on {self._key!r} in {self._label} failed: {_describe(e)}") from None

    def release(self) -> None:
        with contextlib.suppress(AzureError):  # lapsed or taken over: nothing of ours to release
            self._client.release()


class BlobContainerStore:
    """One Blob Storage container as an ObjectStore. Thread-safe as the SDK client is; share one per container."""

    reads_snapshots = True

    def __init__(self, container: ContainerClient, *, read_chunk: int = READ_CHUNK_BYTES,
                 block_size: int = BLOCK_BYTES) -> None:
        self.container = container
        self.label = f"container {container.account_name}/{container.container_name}"
        self._read_chunk, self._block_size = read_chunk, block_size
        base = url_endpoint(container.url)
        if base is None:
            raise ConfigError(f"{self.label}: unexpected container URL scheme")
        self._host, self._port, path = base
        self._prefix = path.rstrip("/") + "/"  # "/devstoreaccount1/exports/" (path-style) or "/exports/"

    def __repr__(self) -> str:
        return f"BlobContainerStore({self.label})"

    def _blob(self, key: str) -> BlobClient:
        return self.container.get_blob_client(check_key(key))

    def _error(self, op: str, key: str, e: AzureError) -> StateError:
        if isinstance(e, HttpResponseError) and _code(e) == "ContainerNotFound":
            return StateError(f"{op} {key!r}: {self.label} does not exist")
        if isinstance(e, HttpResponseError) and _code(e) == "LeaseIdMissing":
            return LeaseUnavailable(f"{op} {key!r} in {self.label}: the object is leased (a lock, not data)")
        return StateError(f"{op} {key!r} in {self.label} failed: {_describe(e)}")

    def _not_found(self, e: ResourceNotFoundError) -> bool:
        """A missing blob, as opposed to a missing container (a configuration error)."""
        return _code(e) != "ContainerNotFound"

    def open_read(self, key: str, snapshot: str | None = None) -> BinaryIO:
        """The blob, or with `snapshot` (its time, as a model.json's `?snapshot=` gives it) that snapshot of it."""
        blob = self._blob(key) if snapshot is None else self.container.get_blob_client(check_key(key),
                                                                                        snapshot=snapshot)
        what = key if snapshot is None else f"{key} (snapshot {snapshot})"
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError as e:
            if self._not_found(e):
                raise NotFound(f"{what} not found in {self.label}") from None
            raise self._error("reading", what, e) from None
        except AzureError as e:
            raise self._error("reading", what, e) from None
        if _is_folder(props.metadata):
            raise NotFound(f"{what} is a folder in {self.label}")
        etag = _etag(props.etag) if snapshot is None else None
        raw = _BlobReader(blob, what, props.size, etag, self._read_chunk, self.label)
        return io.BufferedReader(raw, buffer_size=64 * 1024)

    def read_bytes(self, key: str) -> bytes | None:
        found = self.read_with_etag(key)
        return None if found is None else found[0]

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            download = self._blob(key).download_blob(max_concurrency=1)
            return download.readall(), _etag(download.properties.etag)
        except ResourceNotFoundError as e:
            if self._not_found(e):
                return None
            raise self._error("reading", key, e) from None
        except AzureError as e:
            raise self._error("reading", key, e) from None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            props = self._blob(key).get_blob_properties()
        except ResourceNotFoundError as e:
            if self._not_found(e):
                return None
            raise self._error("reading", key, e) from None
        except AzureError as e:
            raise self._error("reading", key, e) from None
        if _is_folder(props.metadata):
            return None
        return ObjectInfo(key, props.size, _etag(props.etag), props.last_modified.timestamp())

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        if if_match is not None and if_none_match:
            raise ValueError("if_match and if_none_match exclude each other")
        conditions: _Condition = {}
        if if_match is not None:
            conditions = {"etag": _quoted(if_match), "match_condition": MatchConditions.IfNotModified}
        elif if_none_match:
            conditions = {"match_condition": MatchConditions.IfMissing}
        try:
            result = self._blob(key).upload_blob(data, overwrite=True, max_concurrency=1, **conditions)
        except HttpResponseError as e:
            code = _code(e)
            if if_none_match and code == "BlobAlreadyExists":
                raise PreconditionFailed(f"{key} already exists in {self.label}") from None
            if code == "ConditionNotMet" or (if_match is not None and e.status_code in (404, 412)
                                             and not code.startswith("Lease") and code != "ContainerNotFound"):
                raise PreconditionFailed(f"{key} changed in {self.label}") from None
            raise self._error("writing", key, e) from None
        except AzureError as e:
            raise self._error("writing", key, e) from None
        return _etag(result["etag"])

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        """Stage blocks of block_size and commit them at the end: the object appears whole or not at all. Two
        concurrent streams to one key are not supported (committing one discards the other's staged blocks)."""
        blob = self._blob(key)
        run = secrets.token_hex(8)  # all block ids of one blob have the same length
        blocks: list[BlobBlock] = []
        pending = bytearray()

        def stage(data: bytes) -> None:
            block_id = base64.b64encode(f"{run}-{len(blocks):06d}".encode()).decode()
            blob.stage_block(block_id, data)
            blocks.append(BlobBlock(block_id=block_id))

        try:
            for chunk in chunks:
                pending += chunk
                while len(pending) >= self._block_size:
                    stage(bytes(memoryview(pending)[: self._block_size]))
                    del pending[: self._block_size]
            if not blocks:
                result = blob.upload_blob(bytes(pending), overwrite=True, max_concurrency=1)
            else:
                if pending:
                    stage(bytes(pending))
                    pending.clear()
                result = blob.commit_block_list(blocks)
        except AzureError as e:
            raise self._error("writing", key, e) from None
        return _etag(result["etag"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """In key order (the service lists blobs by name); folder markers and names that are not valid keys are
        skipped, as LocalFolderStore skips its temporary files."""
        try:
            for props in self.container.list_blobs(name_starts_with=prefix or None, include=["metadata"]):
                if _is_folder(props.metadata):
                    continue
                try:
                    check_key(props.name)
                except StateError:
                    continue
                yield ObjectInfo(props.name, props.size, _etag(props.etag), props.last_modified.timestamp())
        except AzureError as e:
            raise self._error("listing", prefix, e) from None

    def delete(self, key: str) -> None:
        try:
            self._blob(key).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError as e:
            if not self._not_found(e):
                raise self._error("deleting", key, e) from None
        except AzureError as e:
            raise self._error("deleting", key, e) from None

    def _acquire(self, blob: BlobClient, key: str, seconds: int) -> BlobLeaseClient:
        for _ in range(3):
            try:
                return blob.acquire_lease(lease_duration=seconds)
            except ResourceNotFoundError as e:
                if not self._not_found(e):
                    raise self._error("leasing", key, e) from None
                try:
                    blob.upload_blob(b"", overwrite=False)
                except HttpResponseError as e2:
                    if e2.status_code not in (409, 412):  # 409: created meanwhile; 412: and leased, the retry says so
                        raise self._error("leasing", key, e2) from None
            except HttpResponseError as e:
                if e.status_code == 409 and _code(e) == "LeaseAlreadyPresent":
                    raise LeaseUnavailable(f"{key} is held by another run ({self.label})") from None
                raise self._error("leasing", key, e) from None
        raise StateError(f"leasing {key!r} in {self.label}: the lock object keeps disappearing")

    @contextlib.contextmanager
    def lease(self, key: str, seconds: int = 60) -> Iterator[Lease]:
        """A blob lease of `seconds` clamped to 15-60 (the service's range); holders of longer work call renew()."""
        blob = self._blob(key)
        duration = min(max(int(seconds), LEASE_MIN_SECONDS), LEASE_MAX_SECONDS)
        try:
            held = _BlobLease(self._acquire(blob, key, duration), key, self.label, duration)
        except AzureError as e:
            raise self._error("leasing", key, e) from None
        try:
            yield held
        finally:
            held.release()

    def key_for_url(self, url: str) -> str | None:
        """The key when url names a blob in this account and container (blob or dfs endpoint, query ignored)."""
        endpoint = url_endpoint(url)
        if endpoint is None:
            return None
        host, port, path = endpoint
        return key_below(path, self._prefix) if (host, port) == (self._host, self._port) else None


def container_store(service: BlobServiceClient, container: str, create: bool = False) -> BlobContainerStore:
    """The store for one container of an account; create=True makes the container when it is missing."""
    client = service.get_container_client(container)
    if create:
        try:
            client.create_container()
        except ResourceExistsError:
            pass
        except AzureError as e:
            raise StateError(f"creating container {container!r} failed: {_describe(e)}") from None
    return BlobContainerStore(client)


def from_connection_string(connection_string: str, container: str, create: bool = False) -> BlobContainerStore:
    try:
        service = BlobServiceClient.from_connection_string(connection_string, retry_policy=retry_policy())
    except ValueError:
        raise ConfigError("invalid storage connection string") from None  # never echo it: it holds the key
    return container_store(service, container, create)


def blob_service_from_settings(name: str, environ: Mapping[str, str]) -> BlobServiceClient:
    """The Blob service of an Azure Functions connection setting `name`, resolved as the SDK-type blob binding
    resolves it (connections.py), so the app and the BlobClient the trigger hands over reach the same account: a
    connection string in environ[name], or identity-based (name__serviceUri or name__blobServiceUri, optional
    name__credential + name__clientId for a user-assigned managed identity). A combination the binding cannot use is
    a ConfigError that says what to change."""
    value = (environ.get(name) or "").strip()
    if value.startswith("@Microsoft.KeyVault("):
        raise ConfigError(f"app setting {name} is an unresolved Key Vault reference: grant the app's identity access "
                          "to the vault secret, or set a connection string")
    problem = connections.binding_problem(name, environ)
    if problem:
        raise ConfigError(problem)
    if value:
        try:
            return BlobServiceClient.from_connection_string(value, retry_policy=retry_policy())
        except ValueError:
            raise ConfigError(f"app setting {name} is not a valid storage connection string") from None
    uri = (environ.get(f"{name}__serviceUri") or environ.get(f"{name}__blobServiceUri") or "").strip()
    if not uri:  # binding_problem allows this for AzureWebJobsStorage only
        uri = f"https://{(environ.get(f'{name}__accountName') or '').strip()}.blob.core.windows.net"
    if url_endpoint(uri) is None:
        raise ConfigError(f"app setting {name}__blobServiceUri must be a URL like https://<account>.blob.core.windows.net")
    from azure.identity import DefaultAzureCredential  # only identity-based connections need it

    client_id = (environ.get(f"{name}__clientId") or "").strip()
    credential = DefaultAzureCredential(managed_identity_client_id=client_id) if client_id else DefaultAzureCredential()
    return BlobServiceClient(uri, credential=credential, retry_policy=retry_policy())
