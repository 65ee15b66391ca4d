"""shared.secrets: the API key from Key Vault (through the real SecretClient) or the environment; cached; never leaked.

Key Vault is played by a fake transport under the real azure-keyvault-secrets client: it answers the REST shapes
(401 challenge, 200 secret bundle, 404 SecretNotFound, 403 Forbidden) so the SDK's challenge auth, deserialisation and
error mapping all run. No network is reached.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
import urllib3
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.secrets import SecretClient

from shared import secrets as S
from shared.errors import ConfigError, SecretError

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake-vault-token"
KEY_V1 = "SG.aaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
KEY_V2 = "SG.cccccccccccccccccccccc.ddddddddddddddddddddddddddddddddddddddddddd"
PLAIN_KEY = "k3y-" + "x7Qp" * 8  # not SendGrid-shaped: only the registry can catch it


# ----------------------------------------------------------------------------------------------------- fake Key Vault
class FakeVault(requests.adapters.HTTPAdapter):
    """Key Vault's secret REST surface, answered in-process at the HTTP level (requests adapter)."""

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        super().__init__()
        self.versions: dict[str, list[tuple[str, str]]] = {}
        self.forbidden: set[str] = set()
        self.status_override: int | None = None  # e.g. 503: every authenticated request gets it
        self.unreachable = False
        self.log: list[tuple[str, str, bool]] = []  # (method, path, authenticated)
        self.lock = threading.Lock()
        for name, value in (secrets or {}).items():
            self.set(name, value)

    def set(self, name: str, value: str) -> str:
        version = uuid.uuid4().hex
        self.versions.setdefault(name, []).append((version, value))
        return version

    @property
    def served(self) -> int:
        """Authenticated GET /secrets/... requests (what the cache is meant to save)."""
        return sum(1 for method, path, auth in self.log if auth and method == "GET" and path.startswith("/secrets/"))

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> requests.Response:
        url = urlsplit(request.url)
        authenticated = request.headers.get("Authorization") == f"Bearer {TOKEN}"
        with self.lock:
            self.log.append((request.method, url.path, authenticated))
        if self.unreachable:
            raise requests.exceptions.ConnectionError(f"Failed to resolve '{url.hostname}'")
        status, headers, body = self._answer(request.method or "", url, request.headers.get("Authorization"))
        raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers=headers, status=status, preload_content=False,
                                   reason=requests.status_codes._codes[status][0].upper())
        return self.build_response(request, raw)

    def _answer(self, method: str, url: Any, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        if "api-version=" not in (url.query or ""):
            return _error(400, "BadParameter", "The request URI contains an invalid api-version.")
        if authorization is None:
            challenge = (f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                         'resource="https://vault.azure.net"')
            return 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, b""
        if authorization != f"Bearer {TOKEN}":
            return _error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        if self.status_override is not None:
            return _error(self.status_override, "ServiceUnavailable", "The service is temporarily unavailable.")
        parts = [unquote(p) for p in url.path.split("/") if p]
        if method != "GET" or len(parts) not in (2, 3) or parts[0] != "secrets":
            return _error(400, "BadParameter", "Unsupported request.")
        name = parts[1]
        if name in self.forbidden:
            return _error(403, "Forbidden", "Caller is not authorized to perform action on resource.\r\n"
                          "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'", inner="ForbiddenByRbac")
        versions = self.versions.get(name, [])
        if len(parts) == 3:
            versions = [v for v in versions if v[0] == parts[2]]
        if not versions:
            return _error(404, "SecretNotFound",
                          f"A secret with (name/id) {name} was not found in this key vault. If you recently deleted "
                          "this secret you may be able to recover it using the correct recovery command.")
        version, value = versions[-1]
        vault = f"{url.scheme}://{url.netloc}"
        bundle = {
            "value": value,
            "id": f"{vault}/secrets/{name}/{version}",
            "attributes": {"enabled": True, "created": 1700000000, "updated": 1700000000,
                           "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
            "tags": {},
        }
        return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(bundle).encode()


def _error(status: int, code: str, message: str, inner: str | None = None) -> tuple[int, dict[str, str], bytes]:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps({"error": error}).encode()


class FakeVaultTransport(RequestsTransport):
    """azure-core's real requests transport (an HttpTransport) whose session is wired to FakeVault, not the network."""

    def __init__(self, vault: FakeVault) -> None:
        session = requests.Session()
        session.mount("https://", vault)
        session.mount("http://", vault)
        super().__init__(session=session, session_owner=False)


class FakeCredential:
    """A TokenCredential (and SupportsTokenInfo, which newer azure-core prefers) that records what it is asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.requests: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.error = error

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.requests.append((scopes, kwargs))
        if self.error:
            raise self.error
        return AccessToken(TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: dict[str, Any] | None = None) -> AccessTokenInfo:
        self.requests.append((scopes, dict(options or {})))
        if self.error:
            raise self.error
        return AccessTokenInfo(TOKEN, int(time.time()) + 3600)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault_url() -> str:
    # A fresh host per test: the SDK caches challenges per host process-wide, and each test should see the full flow.
    return f"https://myvault{uuid.uuid4().hex[:10]}.vault.azure.net"


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault({"sendgrid-api-key": KEY_V1})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_provider(vault_url: str, vault: FakeVault, clock: Clock) -> Callable[..., S.KeyVaultSecrets]:
    def make(ttl: float = 300.0, credential: Any = None, **client_kwargs: Any) -> S.KeyVaultSecrets:
        client = SecretClient(vault_url, credential or FakeCredential(), transport=FakeVaultTransport(vault),
                              **client_kwargs)
        return S.KeyVaultSecrets(vault_url, client=client, ttl_seconds=ttl, clock=clock)

    return make


def assert_clean(text: str, *values: str) -> None:
    for value in (KEY_V1, KEY_V2, PLAIN_KEY, *values):
        assert value not in text


# --------------------------------------------------------------------------------------------------------- Key Vault
def test_reads_the_value_through_the_challenge_flow(make_provider: Callable[..., S.KeyVaultSecrets],
                                                    vault: FakeVault, vault_url: str) -> None:
    credential = FakeCredential()
    secret = make_provider(credential=credential).get("sendgrid-api-key")

    assert secret.reveal() == KEY_V1
    assert secret.name == "sendgrid-api-key"
    assert secret.version == vault.versions["sendgrid-api-key"][0][0]
    # The SDK first asks without a token, gets the challenge, then asks for a token for the vault's resource.
    assert vault.log[0] == ("GET", "/secrets/sendgrid-api-key/", False)
    assert vault.log[-1] == ("GET", "/secrets/sendgrid-api-key/", True)
    scopes, options = credential.requests[0]
    assert scopes == ("https://vault.azure.net/.default",)
    assert options.get("tenant_id") == TENANT


def test_cached_within_ttl_and_reread_after(make_provider: Callable[..., S.KeyVaultSecrets], vault: FakeVault,
                                            clock: Clock) -> None:
    provider = make_provider(ttl=300)
    provider.get("sendgrid-api-key")
    assert vault.served == 1

    clock.now += 299.9
    vault.set("sendgrid-api-key", KEY_V2)  # rotated in the vault; the cache does not know yet
    assert provider.get("sendgrid-api-key").reveal() == KEY_V1
    assert vault.served == 1

    clock.now += 0.1  # TTL reached
    assert provider.get("sendgrid-api-key").reveal() == KEY_V2
    assert vault.served == 2
    assert provider.get("sendgrid-api-key").reveal() == KEY_V2
    assert vault.served == 2


def test_ttl_zero_reads_every_time(make_provider: Callable[..., S.KeyVaultSecrets], vault: FakeVault) -> None:
    provider = make_provider(ttl=0)
    provider.get("sendgrid-api-key")
    provider.get("sendgrid-api-key")
    assert vault.served == 2


def test_refresh_after_rotation_returns_the_new_key_once(make_provider: Callable[..., S.KeyVaultSecrets],
                                                         vault: FakeVault) -> None:
    provider = make_provider()
    assert provider.get("sendgrid-api-key").reveal() == KEY_V1
    new_version = vault.set("sendgrid-api-key", KEY_V2)

    refreshed = provider.refresh("sendgrid-api-key")  # what the engine does after SendGrid's 401

    assert refreshed.reveal() == KEY_V2
    assert refreshed.version == new_version
    assert vault.served == 2
    assert provider.get("sendgrid-api-key").reveal() == KEY_V2  # the refreshed value is what is cached now
    assert vault.served == 2


def test_cold_start_threads_share_one_read(make_provider: Callable[..., S.KeyVaultSecrets], vault: FakeVault) -> None:
    provider = make_provider()
    barrier = threading.Barrier(16)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(provider.get("sendgrid-api-key").reveal())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [KEY_V1] * 16
    assert vault.served == 1


def test_not_found_names_vault_and_secret(make_provider: Callable[..., S.KeyVaultSecrets], vault_url: str) -> None:
    with pytest.raises(SecretError) as info:
        make_provider().get("sendgrid-api-key-eu")
    message = str(info.value)
    assert vault_url in message and "'sendgrid-api-key-eu'" in message
    assert "secret name" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_clean(message)


def test_forbidden_explains_the_role_without_the_value(make_provider: Callable[..., S.KeyVaultSecrets],
                                                       vault: FakeVault, vault_url: str) -> None:
    vault.forbidden.add("sendgrid-api-key")
    with pytest.raises(SecretError) as info:
        make_provider().get("sendgrid-api-key")
    message = str(info.value)
    assert "Key Vault Secrets User" in message and vault_url in message and "'sendgrid-api-key'" in message
    assert_clean(message)


def test_authentication_failure_points_at_the_identity(make_provider: Callable[..., S.KeyVaultSecrets]) -> None:
    credential = FakeCredential(ClientAuthenticationError("ManagedIdentityCredential: no identity assigned"))
    with pytest.raises(SecretError) as info:
        make_provider(credential=credential).get("sendgrid-api-key")
    assert "AZURE_CLIENT_ID" in str(info.value)
    assert_clean(str(info.value), TOKEN)


def test_unreachable_vault_without_cache_fails(make_provider: Callable[..., S.KeyVaultSecrets],
                                               vault: FakeVault) -> None:
    vault.unreachable = True
    with pytest.raises(SecretError) as info:
        make_provider(retry_total=0).get("sendgrid-api-key")
    assert "could not reach the vault" in str(info.value)


def test_transient_outage_serves_the_cached_key_but_refresh_does_not(
        make_provider: Callable[..., S.KeyVaultSecrets], vault: FakeVault, clock: Clock) -> None:
    provider = make_provider(retry_total=0)
    provider.get("sendgrid-api-key")
    clock.now += 301
    vault.status_override = 503

    assert provider.get("sendgrid-api-key").reveal() == KEY_V1  # stale but usable; SendGrid's 401 would catch a revoke
    assert vault.served == 2  # it did try the vault
    with pytest.raises(SecretError) as info:
        provider.refresh("sendgrid-api-key")  # the key was rejected: a stale copy is useless
    assert "503" in str(info.value)
    assert_clean(str(info.value))

    vault.status_override = None
    assert provider.get("sendgrid-api-key").reveal() == KEY_V1
    assert vault.served == 4


def test_unresolved_reference_and_empty_value_in_vault(make_provider: Callable[..., S.KeyVaultSecrets],
                                                       vault: FakeVault) -> None:
    reference = "@Microsoft.KeyVault(SecretUri=https://othervault.vault.azure.net/secrets/sg-key/)"
    vault.set("sendgrid-api-key", reference)
    vault.set("blank-key", "  ")
    provider = make_provider()
    with pytest.raises(SecretError) as info:
        provider.get("sendgrid-api-key")
    assert "Key Vault Secrets User" in str(info.value) and "could not resolve" in str(info.value)
    assert "othervault" not in str(info.value)
    with pytest.raises(SecretError, match="empty"):
        provider.get("blank-key")


def test_invalid_names_are_refused_without_echo(make_provider: Callable[..., S.KeyVaultSecrets],
                                                vault: FakeVault) -> None:
    provider = make_provider()
    for bad in (KEY_V1, "", "a" * 128, "sendgrid_api_key", "../keys"):
        with pytest.raises(SecretError) as info:
            provider.get(bad)
        assert "1-127" in str(info.value)
        if bad:
            assert bad not in str(info.value)
    assert vault.log == []  # refused before any request


def test_construction_does_no_io_and_wires_managed_identity(monkeypatch: pytest.MonkeyPatch, vault: FakeVault,
                                                            vault_url: str) -> None:
    import azure.identity
    import azure.keyvault.secrets

    created: list[dict[str, Any]] = []

    class RecordingDefaultCredential(FakeCredential):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            created.append(kwargs)

    real_client = azure.keyvault.secrets.SecretClient
    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", RecordingDefaultCredential)
    monkeypatch.setattr(azure.keyvault.secrets, "SecretClient",
                        lambda url, cred, **kw: real_client(url, cred, transport=FakeVaultTransport(vault), **kw))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network touched at construction")

    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        m.setattr(socket, "getaddrinfo", no_network)
        provider = S.provider_from_env({"KEY_VAULT_URL": vault_url + "/", "AZURE_CLIENT_ID": "1111-client",
                                        "KEY_VAULT_SECRET_TTL_SECONDS": "60", "SENDGRID_API_KEY": "ignored-here"})
    assert isinstance(provider, S.KeyVaultSecrets)
    assert created == [] and vault.log == []

    assert provider.get("sendgrid-api-key").reveal() == KEY_V1  # Key Vault wins over the environment variable
    assert created == [{"managed_identity_client_id": "1111-client"}]


def test_provider_from_env_settings() -> None:
    assert isinstance(S.provider_from_env({"SENDGRID_API_KEY": KEY_V1}), S.EnvSecrets)
    assert isinstance(S.provider_from_env({"KEY_VAULT_URL": "  "}), S.EnvSecrets)
    assert isinstance(S.provider_from_env({"KEY_VAULT_URL": "https://myvault.vault.azure.net"}), S.SecretProvider)
    for bad_ttl in ("soon", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="KEY_VAULT_SECRET_TTL_SECONDS"):
            S.provider_from_env({"KEY_VAULT_URL": "https://myvault.vault.azure.net",
                                 "KEY_VAULT_SECRET_TTL_SECONDS": bad_ttl})
    for bad_url in ("http://myvault.vault.azure.net", "myvault", "https://myvault.vault.azure.net/secrets/x"):
        with pytest.raises(ConfigError, match="KEY_VAULT_URL"):
            S.provider_from_env({"KEY_VAULT_URL": bad_url})


# ------------------------------------------------------------------------------------------------------- environment
def test_env_naming_rule_and_whitespace() -> None:
    provider = S.EnvSecrets({"SENDGRID_API_KEY": f"  {PLAIN_KEY}\n", "SENDGRID_API_KEY_EU": KEY_V2})
    assert provider.get("sendgrid-api-key").reveal() == PLAIN_KEY
    assert provider.get("sendgrid-api-key-eu").reveal() == KEY_V2
    assert provider.get("SendGrid-Api-Key").reveal() == PLAIN_KEY


def test_env_missing_variable_says_what_to_set() -> None:
    with pytest.raises(SecretError) as info:
        S.EnvSecrets({"SENDGRID_API_KEY": KEY_V1}).get("sendgrid-api-key-eu")
    message = str(info.value)
    assert "SENDGRID_API_KEY_EU" in message and "KEY_VAULT_URL" in message
    assert_clean(message)


def test_env_unresolved_reference_empty_and_control_characters() -> None:
    reference = "@Microsoft.KeyVault(VaultName=prodvault;SecretName=sg-key)"
    provider = S.EnvSecrets({"SENDGRID_API_KEY": reference, "BLANK": "", "TWO_LINES": f"{PLAIN_KEY}\r\nX-Evil: 1"})
    with pytest.raises(SecretError) as info:
        provider.get("sendgrid-api-key")
    assert "SENDGRID_API_KEY" in str(info.value) and "Key Vault Secrets User" in str(info.value)
    assert "prodvault" not in str(info.value)
    with pytest.raises(SecretError, match=r"BLANK .*is empty"):
        provider.get("blank")
    with pytest.raises(SecretError, match="control characters") as info:
        provider.get("two-lines")
    assert_clean(str(info.value))


def test_env_refresh_rereads_the_variable() -> None:
    environ = {"SENDGRID_API_KEY": KEY_V1}
    provider = S.EnvSecrets(environ)
    assert provider.get("sendgrid-api-key").reveal() == KEY_V1
    environ["SENDGRID_API_KEY"] = KEY_V2
    assert provider.refresh("sendgrid-api-key").reveal() == KEY_V2


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDGRID_API_KEY_TEST_ONLY", PLAIN_KEY)
    monkeypatch.delenv("KEY_VAULT_URL", raising=False)
    provider = S.provider_from_env()
    assert isinstance(provider, S.EnvSecrets)
    assert provider.get("sendgrid-api-key-test-only").reveal() == PLAIN_KEY


# ------------------------------------------------------------------------------------------------- never leaked
def test_secret_shows_only_its_name() -> None:
    secret = S.Secret("sendgrid-api-key", PLAIN_KEY)
    percent = "%s %r"
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>80}", percent % (secret, secret),
             str.format("{} {:x}", secret, secret), repr([secret]), repr({"key": secret})]
    for text in shown:
        assert "sendgrid-api-key" in text
        assert_clean(text)
    assert repr(secret) == "Secret('sendgrid-api-key', ***)"
    assert secret != PLAIN_KEY
    assert PLAIN_KEY != secret  # noqa: SIM300 (the reflected comparison is the point)
    assert secret != S.Secret("sendgrid-api-key", PLAIN_KEY)  # identity only: no value comparisons
    with pytest.raises(AttributeError):
        secret.name = "other"  # type: ignore[misc]


def test_secret_refuses_pickling_and_copies_are_itself() -> None:
    secret = S.Secret("sendgrid-api-key", PLAIN_KEY)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError) as info:
            pickle.dumps(secret, protocol=protocol)
        assert_clean(str(info.value))
    assert copy.copy(secret) is secret and copy.deepcopy({"k": secret})["k"] is secret


def test_redact_registered_values_sendgrid_shapes_and_bearer_tokens() -> None:
    S.Secret("some-key", PLAIN_KEY)  # constructing (as providers do) registers the value
    unregistered_sg = "SG.zzzzzzzzzzzzzzzzzzzzzz.yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy"
    text = (f"key={PLAIN_KEY}; other {unregistered_sg}, header Authorization: Bearer {TOKEN}==; "
            f"json {json.dumps({'k': PLAIN_KEY})}")
    clean = S.redact(text)
    assert_clean(clean, unregistered_sg, TOKEN)
    assert clean.count("[REDACTED]") == 4
    assert "Authorization: Bearer [REDACTED]" in clean
    assert S.redact("SGT.1.2 and plain text stay") == "SGT.1.2 and plain text stay"

    S.register_secret_value("abc")  # too short to register safely: would shred ordinary text
    assert S.redact("abcdef") == "abcdef"
    S.register_secret_value("abcd" * 3)
    assert S.redact("xxabcdabcdabcdxx") == "xx[REDACTED]xx"


def test_values_read_from_the_vault_are_redacted(make_provider: Callable[..., S.KeyVaultSecrets],
                                                 vault: FakeVault) -> None:
    unshaped = "vault-" + uuid.uuid4().hex * 2
    vault.set("plain-key", unshaped)
    make_provider().get("plain-key")
    assert S.redact(f"oops {unshaped}!") == "oops [REDACTED]!"


@pytest.fixture
def scrubbed_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(S.RedactingFilter())
    logger = logging.getLogger(f"test-secrets-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def test_redacting_filter_scrubs_messages_args_and_tracebacks(scrubbed_logger: tuple[logging.Logger, io.StringIO],
                                                              ) -> None:
    logger, stream = scrubbed_logger
    secret = S.EnvSecrets({"SENDGRID_API_KEY": PLAIN_KEY}).get("sendgrid-api-key")
    logger.info("calling SendGrid with %s", secret.reveal())
    logger.info(f"inline {secret.reveal()} and {secret}")
    logger.warning("foreign key %s seen", "SG.zzzzzzzzzzzzzzzzzzzzzz.yyyyyyyyyyyyyyyyyyyyyyyyy")
    logger.debug("headers %r", {"Authorization": f"Bearer {PLAIN_KEY}"})
    try:
        raise RuntimeError(f"request failed for {secret.reveal()}")
    except RuntimeError:
        logger.exception("send failed")

    output = stream.getvalue()
    assert_clean(output, "zzzzzzzzzzzzzzzzzzzzzz")
    assert "calling SendGrid with [REDACTED]" in output
    assert "Secret('sendgrid-api-key', ***)" in output
    assert "RuntimeError: request failed for [REDACTED]" in output
    assert "Bearer [REDACTED]" in output


def test_redacting_filter_on_caplog(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(S.RedactingFilter())
    try:
        with caplog.at_level(logging.INFO):
            logging.getLogger("shared.engine").info("key %s, n=%d", KEY_V2, 3)
    finally:
        caplog.handler.removeFilter(caplog.handler.filters[-1])
    assert caplog.text.strip().endswith("key [REDACTED], n=3")
    assert_clean(caplog.text)
