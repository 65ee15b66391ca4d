"""The start-up check of the `ExportsStorage` connection settings (shared/connections.py): every combination the
SDK-type blob binding or the Functions host cannot use is refused with a message naming the settings, and every
accepted one is checked against the real binding's own resolution (azurefunctions-extensions-bindings-blob)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import azure.functions as func
import orjson
import pytest
from azurefunctions.extensions.bindings.blob.utils import service_client_factory

from shared import connections
from shared.context import AppContext, Settings
from shared.errors import ConfigError

NAME = "ExportsStorage"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's, public
CS = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={KEY};EndpointSuffix=core.windows.net"
BLOB, QUEUE = "https://acct.blob.core.windows.net", "https://acct.queue.core.windows.net"
CLIENT_ID = "00000000-1111-2222-3333-444444444444"
UAMI = {f"{NAME}__credential": "managedidentity", f"{NAME}__clientId": CLIENT_ID}
URIS = {f"{NAME}__blobServiceUri": BLOB, f"{NAME}__queueServiceUri": QUEUE}

ACCEPTED = {
    "connection string": {NAME: CS},
    "user-assigned identity (what infra/ sets)": {**URIS, **UAMI},
    "system-assigned identity": URIS,
    "system-assigned, credential named": {**URIS, f"{NAME}__credential": "managedidentity"},
    "credential in another case": {**URIS, **UAMI, f"{NAME}__credential": "ManagedIdentity"},
    "serviceUri equal to blobServiceUri": {**URIS, **UAMI, f"{NAME}__serviceUri": BLOB + "/"},
    "an extra tableServiceUri": {**URIS, **UAMI, f"{NAME}__tableServiceUri": "https://acct.table.core.windows.net"},
}

# (settings, words the message must hold, whether the blob binding itself cannot use them)
REFUSED = {
    "connection string with the identity": ({NAME: CS, **UAMI}, ["connection string", f"{NAME}__credential",
                                                                 f"{NAME}__clientId", f"delete {NAME}"], True),
    "connection string with a blob URI": ({NAME: CS, f"{NAME}__blobServiceUri": BLOB},
                                          [f"{NAME}__blobServiceUri", "as if it were a URL"], True),
    "empty connection string beside the identity": ({NAME: " ", **URIS, **UAMI}, ["set but empty", f"Delete {NAME}"],
                                                    True),
    "account name alone": ({f"{NAME}__accountName": "acct", f"{NAME}__queueServiceUri": QUEUE, **UAMI},
                           [f"{NAME}__accountName alone", f"{NAME}__blobServiceUri=https://"], True),
    "two different blob endpoints": ({**URIS, **UAMI, f"{NAME}__serviceUri": "https://other.blob.core.windows.net"},
                                     ["different endpoints", f"Delete {NAME}__serviceUri"], True),
    "client id without credential": ({**URIS, f"{NAME}__clientId": CLIENT_ID},
                                     [f"without {NAME}__credential", "system-assigned"], False),
    "credential other than managedidentity": ({**URIS, **UAMI, f"{NAME}__credential": "clientsecret"},
                                              ["'clientsecret'", "'managedidentity'"], False),
    "serviceUri form for blobs and queues": ({f"{NAME}__serviceUri": BLOB, f"{NAME}__queueServiceUri": QUEUE, **UAMI},
                                             [f"{NAME}__serviceUri cannot serve", f"{NAME}__blobServiceUri"], False),
    "no queue endpoint": ({f"{NAME}__blobServiceUri": BLOB, **UAMI}, [f"{NAME}__queueServiceUri is missing",
                                                                      "runs queue", "poison queue"], False),
    "nothing set": ({}, ["not configured", f"{NAME}__blobServiceUri"], True),
}


@pytest.mark.parametrize("settings", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_accepted_settings_pass(settings: dict[str, str]) -> None:
    assert connections.problem(NAME, settings) is None


@pytest.mark.parametrize("settings,words,_binding", list(REFUSED.values()), ids=list(REFUSED))
def test_refused_settings_say_which_and_what_to_do(settings: dict[str, str], words: list[str],
                                                   _binding: bool) -> None:
    message = connections.problem(NAME, settings)
    assert message is not None
    for word in words:
        assert word in message, (word, message)
    assert KEY not in message  # a connection string's key is never repeated


@pytest.fixture
def binding_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """os.environ without any ExportsStorage setting: the binding reads the process environment."""
    for key in [k for k in os.environ if k == NAME or k.startswith(f"{NAME}__")]:
        monkeypatch.delenv(key)
    yield monkeypatch


@pytest.mark.parametrize("settings", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_the_real_binding_reaches_the_account_for_every_accepted_setting(binding_env: pytest.MonkeyPatch,
                                                                          settings: dict[str, str]) -> None:
    for key, value in settings.items():
        binding_env.setenv(key, value)
    client = service_client_factory(NAME)
    assert client.account_name == "acct" and client.url.rstrip("/") == BLOB


@pytest.mark.parametrize("settings", [s for s, _, binding in REFUSED.values() if binding],
                         ids=[k for k, (_, _, binding) in REFUSED.items() if binding])
def test_the_real_binding_cannot_use_what_the_binding_check_refuses(binding_env: pytest.MonkeyPatch,
                                                                    settings: dict[str, str]) -> None:
    assert connections.binding_problem(NAME, settings)
    for key, value in settings.items():
        binding_env.setenv(key, value)
    try:
        client = service_client_factory(NAME)
    except ValueError:
        return  # "does not exist" / "Invalid URL": the invocation would fail in the binding
    # it built a client, but not one for the account the host and this app use
    assert client.account_name != "acct" or client.url.rstrip("/") != BLOB, client.url


# ------------------------------------------------------------------------------------------------- the app refuses
ACCOUNT_NAME_ONLY = {f"{NAME}__accountName": "acct", f"{NAME}__queueServiceUri": QUEUE, **UAMI}


def test_the_app_refuses_before_building_any_client(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(ACCOUNT_NAME_ONLY)
    with caplog.at_level(logging.CRITICAL, logger="shared.context"):
        for _ in range(3):  # every invocation fails with the reason ...
            with pytest.raises(ConfigError, match="__accountName alone is not enough"):
                AppContext.from_settings(settings)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1  # ... and the worker's log says it once, as one clear line
    assert "refuses to work until its storage settings are fixed" in critical[0].getMessage()
    assert "ExportsStorage__blobServiceUri" in critical[0].getMessage()


@pytest.fixture
def misconfigured(binding_env: pytest.MonkeyPatch):
    import function_app

    for key, value in {NAME: CS, **UAMI, "RUNS_QUEUE": "runs"}.items():
        binding_env.setenv(key, value)
    return function_app


def test_every_function_of_a_misconfigured_app_fails_with_the_reason(misconfigured) -> None:
    import azure.functions.timer as timer

    resp = misconfigured.list_destinations(func.HttpRequest("GET", "http://localhost/api/destinations", body=b""))
    assert resp.status_code == 500
    error = orjson.loads(resp.get_body())["error"]
    assert error.startswith("configuration problem: app setting ExportsStorage (a connection string)")
    assert KEY not in error
    with pytest.raises(ConfigError, match="connection string"):
        misconfigured.scheduled_refresh(timer.TimerRequest(past_due=False))
    with pytest.raises(ConfigError, match="connection string"):
        misconfigured.run_queued_export(func.QueueMessage(body=b'{"run_id": "x", "destination": "y"}'))

    class Client:
        blob_name = "BlobExport/model.json"

    with pytest.raises(ConfigError, match="connection string"):
        misconfigured.on_export(Client())
