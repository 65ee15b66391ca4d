"""One destination run by the engine in this process: config, state and exports in local folders, the sandbox over
HTTP on loopback. Test modules subclass it with the exports they write (test_delta, test_run_limits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from sandbox.server import Sandbox
from shared import engine
from shared.config import load_config
from shared.secrets import EnvSecrets
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.state import StateStore
from shared.storage import LocalFolderStore

PUT = "PUT /v3/marketing/contacts"


class EngineWorld:
    def __init__(self, box: Sandbox, url: str, tmp: Path, *, key: str, mapping: dict[str, str],
                 policy: RetryPolicy) -> None:
        self.box, self.url, self.tmp, self.policy = box, url, tmp, policy
        self.environ = {"SENDGRID_API_KEY": key, "SENDGRID_API_URL": url}
        self.exports = LocalFolderStore(tmp / "exports")
        self.config = tmp / "destinations.json"
        self.list_id = box.create_list("members")
        self.settings: dict[str, Any] = {
            "name": "members", "consent": True, "api_key_secret": "sendgrid-api-key", "list_id": self.list_id,
            "segments": ["members"], "mode": "upsert", "max_profiles": None, "bulk_threshold": None,
            "mapping": mapping}
        self.configure()

    def configure(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config.write_bytes(orjson.dumps({"destinations": [self.settings]}))

    def services(self) -> engine.Services:
        secrets = EnvSecrets(self.environ)
        return engine.Services(config=load_config(self.config), secrets=secrets,
                               state=StateStore(LocalFolderStore(self.tmp / "state")), sources=self.exports,
                               environ=self.environ, poll_interval=0.05, wait_timeout=30.0,
                               client_factory=lambda d: SendGridClient(self.url, secrets, d.api_key_secret,
                                                                       policy=self.policy))

    def run(self, key: str, **request: Any) -> dict[str, Any]:
        """The run of export `key` to its end (wait=True); the sandbox's jobs are then applied."""
        info = self.exports.info(key)
        assert info is not None
        report = engine.run(engine.RunRequest("members", key, info.etag, wait=True, **request), self.services())
        self.box.complete_jobs()
        return report

    def puts(self) -> int:
        return int(self.box.stats["requests"].get(PUT, 0))
