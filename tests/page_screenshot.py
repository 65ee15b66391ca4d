"""Make the README's screenshot of the run-history page from real runs: `python -m tests.page_screenshot OUT.png`.

In a temporary folder: the local SendGrid sandbox, a few daily Customer Insights exports (generated), the blob
trigger, the timer with a due schedule, an on-demand dry run and a command-line run of an export missing a file,
then `python -m shared ui` and a headless Chromium screenshot of the page it writes (tests/chromium.py)."""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from sandbox import samplegen
from sandbox.server import Sandbox, serve
from shared import app, cli, http_api, queue_worker
from shared.context import AppContext, Settings
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore
from tests import chromium


def _destinations(list_id: str) -> dict[str, object]:
    vip = samplegen.demo_destinations(list_id, max_profiles=None)["destinations"][0] | {"schedule": "0 0 6 * * *"}
    lapsed = vip | {"name": "lapsed-customers", "display_name": "Win-back: lapsed customers", "mode": "mirror",
                    "segments": ["LapsedSegment"], "schedule": None,
                    "custom_fields": {"lifetime_value": "LifetimeValue", "churn_score": "LifetimeValue"}}
    return {"destinations": [vip, lapsed]}


def make(out: Path) -> None:
    key = "SG.shot-" + "k" * 22 + "." + "s" * 43
    box = Sandbox(api_keys=[key], job_delay=0.0)
    with tempfile.TemporaryDirectory() as tmp, serve(box) as server:
        root = Path(tmp)
        env = {"SENDGRID_API_URL": server.url, "SENDGRID_API_KEY": key}
        os.environ.update(env)
        list_id = box.create_list("VIP newsletter")
        box.create_field("lifetime_value", "Number")
        box.create_field("signup_date", "Date")
        (root / "state").mkdir()
        (root / "destinations.json").write_bytes(orjson.dumps(_destinations(list_id)))
        settings = Settings("exports", "state", str(root / "destinations.json"), 600.0, env)

        def ctx() -> AppContext:
            return AppContext(settings, LocalFolderStore(root / "exports"),
                              StateStore(LocalFolderStore(root / "state")), EnvSecrets(env))

        today = datetime.now(UTC).replace(hour=1, minute=30, second=0, microsecond=0)
        day = today - timedelta(days=4)  # four daily exports up to today's
        for n, profiles in enumerate((5_200, 5_450, 5_300, 5_900)):  # each day: the export, then a timer tick
            info = samplegen.write_cdm_export(root / "exports", profiles, seed=n, partitions=2,
                                              when=day + timedelta(days=n), bad_fraction=0.01 + 0.01 * n)
            app.on_blob(ctx(), info.model_key)
            app.on_timer(ctx(), now=(day + timedelta(days=n, hours=3)).timestamp())
        app.on_timer(ctx(), now=(day + timedelta(days=4, hours=5)).timestamp())  # today's 06:00 run
        box.complete_jobs()
        lapsed = samplegen.write_cdm_export(root / "exports", 800, seed=9, segment="LapsedSegment",
                                            export_folder="LapsedExport", when=day)
        app.on_blob(ctx(), lapsed.model_key)  # refused: its custom field churn_score is not in the account
        answer = http_api.handle("POST", "destinations/{name}/runs", {"name": "vip-newsletter"}, {},
                                 b'{"dry_run": true}', ctx())
        queue_worker.work(ctx(), orjson.dumps(answer.message or {}))
        model = root / "exports" / info.model_key
        meta = orjson.loads(model.read_bytes())
        meta["entities"][0]["partitions"][1]["location"] += ".missing"  # a file the export names is not there
        model.write_bytes(orjson.dumps(meta))
        cli.main(["export", "--config", str(root / "destinations.json"), "--destination", "vip-newsletter",
                  "--source", str(model), "--state-dir", str(root / "state"), "--wait", "--quiet"])
        page = root / "history.html"
        cli.main(["ui", "--state-dir", str(root / "state"), "--out", str(page), "--config",
                  str(root / "destinations.json")])
        with chromium.browser() as chrome:
            out.write_bytes(chrome.load(page.as_uri(), width=1180, height=760).screenshot())


if __name__ == "__main__":
    make(Path(sys.argv[1]))
