"""The SendGrid API key: from Azure Key Vault or, locally, from the environment. Cached, and never leaked.

A `Secret` shows only its name in repr/str/format and refuses pickling. Every value a provider hands out is registered
so that `redaction.redact()` scrubs it from text, errors and log records, together with anything shaped like a
SendGrid key (`SG.xxx.yyy`) and bearer tokens (see shared/redaction.py, re-exported here). Error messages name the
secret, the variable or the vault and what to check, never the value.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable
from urllib.parse import urlsplit

from .errors import ConfigError, SecretError
from .redaction import REDACTED as REDACTED  # re-exported: callers import redaction's names from here
from .redaction import RedactingFilter as RedactingFilter
from .redaction import install_log_redaction as install_log_redaction
from .redaction import redact as redact
from .redaction import register_secret_value

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.keyvault.secrets import SecretClient

log = logging.getLogger(__name__)

KEY_VAULT_URL_SETTING = "KEY_VAULT_URL"
TTL_SETTING = "KEY_VAULT_SECRET_TTL_SECONDS"
CLIENT_ID_SETTING = "AZURE_CLIENT_ID"
DEFAULT_TTL_SECONDS = 300.0

_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")  # Key Vault's secret-name rule
_UNRESOLVED_REFERENCE = "@microsoft.keyvault("  # compared lower-case
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REFERENCE_HELP = (
    "check that the app's managed identity has the "
    "'Key Vault Secrets User' role on the vault (and keyVaultReferenceIdentity for a user-assigned identity), the "
    "reference syntax @Microsoft.KeyVault(SecretUri=https://<vault>.vault.azure.net/secrets/<name>/) or "
    "@Microsoft.KeyVault(VaultName=<vault>;SecretName=<name>), and the reference status shown for the setting in the "
    "portal"
)


# ------------------------------------------------------------------------------------------------------------ Secret
class Secret:
    """A secret value that shows only its name. Equality and hashing are by identity, so nothing compares values."""

    __slots__ = ("_value", "name", "version")
    _value: str
    name: str
    version: str | None  # Key Vault version id (not secret); None for the environment

    def __init__(self, name: str, value: str, version: str | None = None) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "version", version)
        register_secret_value(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, ***)"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __setattr__(self, key: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, key: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("Secret cannot be pickled: it would write the value out; pass the secret name instead")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


@runtime_checkable
class SecretProvider(Protocol):
    def get(self, name: str) -> Secret:
        """The secret, from the cache when fresh."""
        ...

    def refresh(self, name: str) -> Secret:
        """Re-read once, bypassing the cache (SendGrid answered 401: the key was rotated)."""
        ...


# ---------------------------------------------------------------------------------------------------------- checks
def check_name(name: str) -> str:
    """Key Vault's rule: 1-127 letters, digits and '-'. An invalid name is not echoed (it may be a pasted key)."""
    if not isinstance(name, str) or not _NAME.match(name):
        length = len(name) if isinstance(name, str) else 0
        raise SecretError(
            f"invalid secret name ({length} characters, not shown in case it is a key): use 1-127 letters, digits "
            "and '-', e.g. 'sendgrid-api-key'"
        )
    return name


def env_var_for(name: str) -> str:
    """'sendgrid-api-key' -> 'SENDGRID_API_KEY'."""
    return check_name(name).upper().replace("-", "_")


def _checked_value(value: str | None, where: str) -> str:
    """Refuse empty values, unresolved platform references and control characters, never showing the value.

    Surrounding whitespace is stripped: a trailing newline from a pasted key would otherwise make the HTTP client
    reject the Authorization header with an error that quotes it.
    """
    value = (value or "").strip()
    if not value:
        raise SecretError(f"{where} is empty: store the SendGrid API key in it")
    if _UNRESOLVED_REFERENCE in value.lower():
        raise SecretError(f"{where} holds a Key Vault reference the platform could not resolve: {_REFERENCE_HELP}")
    if _CONTROL.search(value):
        raise SecretError(f"{where} contains control characters (not shown): store the key on one line")
    return value


# ------------------------------------------------------------------------------------------------------ environment
class EnvSecrets:
    """Secrets from environment variables (local runs, tests). Reading a mapping is free, so nothing is cached:
    `get` and `refresh` both read the variable, and a changed variable is seen at once."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def _read(self, name: str) -> Secret:
        var = env_var_for(name)
        environ = os.environ if self._environ is None else self._environ
        raw = environ.get(var)
        if raw is None:
            raise SecretError(
                f"secret '{name}' is not available: set the environment variable {var}, or set {KEY_VAULT_URL_SETTING} "
                "to read it from Azure Key Vault"
            )
        return Secret(name, _checked_value(raw, f"environment variable {var} (secret '{name}')"))

    def get(self, name: str) -> Secret:
        return self._read(name)

    def refresh(self, name: str) -> Secret:
        return self._read(name)


# -------------------------------------------------------------------------------------------------------- Key Vault
@dataclass(frozen=True)
class _Entry:
    secret: Secret
    fetched_at: float


def check_vault_url(vault_url: str) -> str:
    """An https URL with a host and no path, e.g. https://myvault.vault.azure.net (any cloud's vault domain)."""
    url = (vault_url or "").strip()
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"invalid Key Vault URL {url!r}: use the vault's https URL, e.g. https://myvault.vault.azure.net",
            field=KEY_VAULT_URL_SETTING,
        )
    return url.rstrip("/")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return redact(line)[:300]


def _is_transient(exc: BaseException) -> bool:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    status = getattr(exc, "status_code", None) if isinstance(exc, HttpResponseError) else None
    return status is not None and (status == 429 or status >= 500)


def _vault_error(exc: Exception, vault_url: str, name: str) -> SecretError:
    """Translate an Azure SDK error into a SecretError saying what to check."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    where = f"Key Vault {vault_url}, secret '{name}'"
    detail = _first_line(exc)
    if isinstance(exc, ResourceNotFoundError):
        hint = "the secret does not exist: check the secret name (the destination's api_key_secret) and the vault URL"
    elif isinstance(exc, ClientAuthenticationError):
        hint = (
            "could not authenticate: check the managed identity (AZURE_CLIENT_ID for a user-assigned one) or, "
            "locally, `az login` / the AZURE_* service principal variables"
        )
    elif isinstance(exc, HttpResponseError) and exc.status_code == 403:
        hint = (
            "access denied: give the identity the 'Key Vault Secrets User' role on the vault (or a get-secret access "
            "policy), check the secret is enabled and the vault firewall / private endpoint allows this app"
        )
    elif isinstance(exc, ServiceRequestError | ServiceResponseError):
        hint = "could not reach the vault: check the vault URL, DNS, the network (VNet, private endpoint, firewall)"
    elif isinstance(exc, HttpResponseError):
        hint = f"the vault answered HTTP {exc.status_code}: retry later; check the vault's health and throttling"
    else:
        hint = "unexpected error reading the secret"
    return SecretError(f"{where}: {hint} ({type(exc).__name__}: {detail})")


class KeyVaultSecrets:
    """Secrets from Azure Key Vault, cached for `ttl_seconds` per name; thread-safe.

    The SecretClient (and DefaultAzureCredential) is created on first use, so construction does no I/O. Fetches happen
    under one lock: concurrent callers at a cold start wait for one read instead of each hitting the vault. When a
    cached value has expired and the vault is briefly unavailable (network, 5xx, 429), `get` keeps serving the last
    value (a revoked key is then caught by SendGrid's 401 and `refresh`, which never serves stale values).
    """

    def __init__(
        self,
        vault_url: str,
        *,
        credential: TokenCredential | None = None,
        client: SecretClient | None = None,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        client_id: str | None = None,
    ) -> None:
        if not (ttl_seconds >= 0 and ttl_seconds != float("inf")):
            raise ConfigError(f"secret TTL must be a finite number of seconds >= 0, got {ttl_seconds!r}",
                              field=TTL_SETTING)
        self.vault_url = check_vault_url(vault_url)
        self._credential = credential
        self._client = client
        self._owns_client = client is None
        self._client_id = client_id or None
        self._ttl = float(ttl_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _Entry] = {}
        self._generation: dict[str, int] = {}  # bumped on every successful read; lets concurrent refreshes share one

    def __repr__(self) -> str:
        return f"KeyVaultSecrets({self.vault_url!r}, ttl_seconds={self._ttl})"

    def _secret_client(self) -> SecretClient:
        if self._client is None:  # called with the lock held
            from azure.keyvault.secrets import SecretClient

            credential = self._credential
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = self._credential = DefaultAzureCredential(managed_identity_client_id=self._client_id)
            self._client = SecretClient(self.vault_url, credential)
        return self._client

    def _fetch(self, name: str, stale: _Entry | None = None) -> Secret:
        """Read the latest version from the vault (lock held), cache and return it.

        With `stale` given, a transient vault failure returns that entry's secret instead of raising.
        """
        from azure.core.exceptions import AzureError

        try:
            bundle = self._secret_client().get_secret(name)
        except AzureError as exc:
            if stale is not None and _is_transient(exc):
                log.warning("Key Vault %s unavailable (%s); using the cached secret '%s' until it answers",
                            self.vault_url, type(exc).__name__, name)
                return stale.secret
            raise _vault_error(exc, self.vault_url, name) from None
        version = getattr(bundle.properties, "version", None)
        value = _checked_value(bundle.value, f"Key Vault {self.vault_url}, secret '{name}'")
        secret = Secret(name, value, version)
        self._cache[name] = _Entry(secret, self._clock())
        self._generation[name] = self._generation.get(name, 0) + 1
        log.debug("read secret '%s' (version %s) from %s", name, version, self.vault_url)
        return secret

    def get(self, name: str) -> Secret:
        check_name(name)
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None and self._clock() - entry.fetched_at < self._ttl:
                return entry.secret
            return self._fetch(name, stale=entry)

    def refresh(self, name: str) -> Secret:
        check_name(name)
        seen = self._generation.get(name, 0)
        with self._lock:
            if self._generation.get(name, 0) != seen:  # another thread re-read it while we waited: share that read
                return self._cache[name].secret
            self._cache.pop(name, None)
            return self._fetch(name)

    def close(self) -> None:
        """Close the client and credential this object created (injected ones belong to the caller)."""
        with self._lock:
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None
                closer = getattr(self._credential, "close", None)
                if callable(closer):
                    closer()


# ------------------------------------------------------------------------------------------------------------ choice
def _ttl_from(environ: Mapping[str, str]) -> float:
    raw = (environ.get(TTL_SETTING) or "").strip()
    if not raw:
        return DEFAULT_TTL_SECONDS
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not (0 <= ttl < float("inf")):
        raise ConfigError(f"{TTL_SETTING} must be a number of seconds >= 0, got {raw!r}", field=TTL_SETTING)
    return ttl


def provider_from_env(environ: Mapping[str, str] | None = None) -> SecretProvider:
    """KEY_VAULT_URL set: Key Vault via DefaultAzureCredential (AZURE_CLIENT_ID selects a user-assigned identity),
    created lazily; otherwise environment variables. No network at construction."""
    env = os.environ if environ is None else environ
    vault_url = (env.get(KEY_VAULT_URL_SETTING) or "").strip()
    if not vault_url:
        return EnvSecrets(environ)
    return KeyVaultSecrets(vault_url, ttl_seconds=_ttl_from(env), client_id=(env.get(CLIENT_ID_SETTING) or "").strip()
                           or None)
