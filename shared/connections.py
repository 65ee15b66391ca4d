"""Which storage connection settings the Functions app can use: pure checks of app settings, no I/O.

One connection (`ExportsStorage`) serves four clients that read its settings differently:
- the SDK-type blob binding (azurefunctions-extensions-bindings-blob 1.1, `utils.service_client_factory`): a
  connection string in `NAME` wins whenever that setting exists, even empty; else `NAME__serviceUri`, else
  `NAME__blobServiceUri` (`NAME__accountName` only for AzureWebJobsStorage); a user-assigned identity only when
  `NAME__credential` and `NAME__clientId` are both set, the system-assigned identity otherwise. A connection string
  together with a service URI or `__credential` + `__clientId` becomes `BlobServiceClient(account_url=<the
  connection string>)`: a client of no account that carries the account key in its URL;
- the Functions host's blob trigger, queue trigger and queue output: identity-based, a connection used by blobs and
  queues needs `NAME__blobServiceUri` and `NAME__queueServiceUri` (the `__serviceUri` form "can't be used when the
  overall connection configuration is to be used across blobs, queues"), and `__clientId` counts only with
  `__credential` set to `managedidentity`;
- this app's own client (blobstore.blob_service_from_settings), which resolves the account as the binding does.

`binding_problem` says what the binding cannot use; `problem` adds the host's rules for a connection that a blob
trigger and queues share. Each answer names the settings and says what to change.
"""

from __future__ import annotations

from collections.abc import Mapping

MANAGED_IDENTITY = "managedidentity"
IDENTITY_PROPERTIES = ("serviceUri", "blobServiceUri", "queueServiceUri", "tableServiceUri", "accountName",
                       "credential", "clientId")
HOST_STORAGE = "AzureWebJobsStorage"  # the one connection the binding resolves through __accountName


def _value(environ: Mapping[str, str], key: str) -> str | None:
    """The setting's value stripped, or None when it is not set at all."""
    raw = environ.get(key)
    return None if raw is None else raw.strip()


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def binding_problem(name: str, environ: Mapping[str, str]) -> str | None:
    """Why the SDK-type blob binding (and so this app's client, which resolves the account the same way) cannot use
    connection `name` as set in `environ`, or None."""
    conn = _value(environ, name)
    identity = sorted(f"{name}__{p}" for p in IDENTITY_PROPERTIES if _value(environ, f"{name}__{p}") is not None)
    if conn is not None and not conn:
        return (f"app setting {name} is set but empty: the blob binding would take it as a connection string. Delete "
                f"{name}" + (f" to use the identity-based settings ({', '.join(identity)})" if identity else
                             ", or set it to a storage connection string"))
    if conn is not None and identity:
        return (f"app setting {name} (a connection string) is set together with {', '.join(identity)}: the blob "
                f"binding would build a client from the connection string as if it were a URL. Keep one way: delete "
                f"{name} to connect with the identity, or delete the {name}__* settings to use the connection string")
    if conn is not None:
        return None
    service_uri, blob_uri = _value(environ, f"{name}__serviceUri"), _value(environ, f"{name}__blobServiceUri")
    if not service_uri and not blob_uri:
        if _value(environ, f"{name}__accountName") and name != HOST_STORAGE:
            return (f"app setting {name}__accountName alone is not enough: the blob binding accepts it only for "
                    f"{HOST_STORAGE}. Set {name}__blobServiceUri=https://<account>.blob.core.windows.net (and "
                    f"{name}__queueServiceUri) instead")
        if name == HOST_STORAGE and _value(environ, f"{name}__accountName"):
            return None
        return (f"storage connection {name!r} is not configured: set {name} to a connection string, or "
                f"{name}__blobServiceUri and {name}__queueServiceUri (plus {name}__credential=managedidentity and "
                f"{name}__clientId for a user-assigned managed identity)")
    if service_uri and blob_uri and not _same_url(service_uri, blob_uri):
        return (f"app settings {name}__serviceUri and {name}__blobServiceUri name different endpoints: the blob "
                f"binding uses the first, the Functions host the second. Delete {name}__serviceUri")
    credential, client_id = _value(environ, f"{name}__credential"), _value(environ, f"{name}__clientId")
    if credential is not None and credential.lower() != MANAGED_IDENTITY:
        return (f"app setting {name}__credential is {credential!r}: the only value the Functions host and the blob "
                f"binding know is {MANAGED_IDENTITY!r}")
    if client_id and credential is None:
        return (f"app setting {name}__clientId is set without {name}__credential: the blob binding and the Functions "
                f"host would use the app's system-assigned identity, not this one. Set {name}__credential="
                f"{MANAGED_IDENTITY}")
    return None  # __credential without __clientId: the system-assigned identity, on purpose


def problem(name: str, environ: Mapping[str, str]) -> str | None:
    """Why connection `name` cannot serve a blob trigger, its SDK-type binding and queue bindings at once, or None."""
    found = binding_problem(name, environ)
    if found or _value(environ, name):
        return found
    if _value(environ, f"{name}__serviceUri") and not _value(environ, f"{name}__blobServiceUri"):
        return (f"app setting {name}__serviceUri cannot serve this connection: the Functions host takes that form only "
                f"for a connection used by blobs alone, and {name} also carries the runs queue and the blob "
                f"trigger's poison queue. Set {name}__blobServiceUri and {name}__queueServiceUri instead")
    if not _value(environ, f"{name}__queueServiceUri"):
        return (f"app setting {name}__queueServiceUri is missing: the runs queue (HTTP API and its worker) and the "
                f"blob trigger's poison queue use it. Set it to https://<account>.queue.core.windows.net")
    return None
