"""Cold start: the HTTP routes that only read state answer without loading the engine, numpy or the exporting modules
(issue 16). Each Functions worker process imports function_app once, for every trigger; what a door needs beyond
that is imported where it is used. Checked in a fresh interpreter, as a new worker process would start, against a
real Azurite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
from azure.storage.blob import BlobServiceClient

from sandbox import samplegen
from shared import http_api
from shared.context import AppContext, Settings

REPO = Path(__file__).resolve().parent.parent
NAME = "vip-newsletter"
RUN_ID = "20260101T120000Z-0a1b2c3d"

# What a read-only route must not load: the engine and its stream, numpy, and the modules that read exports, pack,
# send or keep snapshots (they only serve the exporting doors: blob, timer, queue, CLI).
EXPORTING = ("numpy", "shared.engine", "shared.stream", "shared.pipeline", "shared.batching", "shared.bulk",
             "shared.dedup", "shared.sources", "shared.cdm", "shared.snapshots", "shared.listsync", "shared.purge")

# In the child: import the app as the worker does, answer each read-only route as the host would call it, and say
# what it answered and which of EXPORTING got loaded.
CHILD = """
import json, sys
import azure.functions as func
import function_app

class Out:
    def set(self, value): raise AssertionError("a read-only route queued a message")

def get(function, **route_params):
    req = func.HttpRequest("GET", "http://localhost/api/x", body=b"", route_params=route_params, params={})
    fn = getattr(function_app, function)
    return (fn(req, Out()) if function == "destination_runs" else fn(req)).status_code

answers = {"list_destinations": get("list_destinations"), "destination_runs": get("destination_runs", name=sys.argv[1]),
           "get_run": get("get_run", run_id=sys.argv[2]), "history_page": get("history_page"),
           "run_page": get("run_page", run_id=sys.argv[2])}
print(json.dumps({"answers": answers, "loaded": sorted(m for m in json.loads(sys.argv[3]) if m in sys.modules)}))
"""


def test_read_only_http_routes_load_neither_numpy_nor_the_engine(azurite) -> None:
    suffix = uuid.uuid4().hex[:10]
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    exports, state = service.create_container(f"exports-{suffix}"), service.create_container(f"state-{suffix}")
    env = {**os.environ, "ExportsStorage": azurite.connection_string, "EXPORTS_CONTAINER": exports.container_name,
           "STATE_CONTAINER": state.container_name, "DESTINATIONS_CONFIG": "blob:destinations.json",
           "PYTHONPATH": str(REPO)}
    env.pop("KEY_VAULT_URL", None)
    try:
        config = samplegen.demo_destinations(str(uuid.uuid4()))
        state.upload_blob("destinations.json", orjson.dumps(config))
        ctx = AppContext.from_settings(Settings.from_env(env))
        dest = ctx.config().destinations[NAME]
        ctx.state.save_run(http_api.queued_record(dest, RUN_ID, "x/model.json", "etag", False))
        child = subprocess.run([sys.executable, "-c", CHILD, NAME, RUN_ID, json.dumps(EXPORTING)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-3000:]
        out = json.loads(child.stdout.strip().splitlines()[-1])
        assert out["answers"] == {"list_destinations": 200, "destination_runs": 200, "get_run": 200,
                                  "history_page": 200, "run_page": 200}
        assert out["loaded"] == [], f"a read-only HTTP route loaded {', '.join(out['loaded'])}"
    finally:
        service.delete_container(exports.container_name)
        service.delete_container(state.container_name)
        service.close()
