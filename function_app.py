"""Azure Functions (Python v2) wiring: each trigger hands off to shared.app in a few lines. No business rules here."""

from __future__ import annotations

import logging
import os

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from shared import app as connector
from shared.secrets import RedactingFilter

for _handler in logging.getLogger().handlers:
    _handler.addFilter(RedactingFilter())

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _context() -> connector.AppContext:
    return connector.AppContext.from_settings(connector.Settings.from_env(os.environ))


@app.blob_trigger(arg_name="client", path="%EXPORTS_CONTAINER%/{name}", connection="ExportsStorage",
                  source="EventGrid")
def on_export(client: blob.BlobClient) -> None:
    """A new blob in the exports container: a model.json (a finished Customer Insights export) or a plain file."""
    connector.on_blob(_context(), client.blob_name)


@app.timer_trigger(arg_name="timer", schedule="%REFRESH_SCHEDULE%", run_on_startup=False, use_monitor=True)
def scheduled_refresh(timer: func.TimerRequest) -> None:
    """Finish open runs, then export each destination's latest export not yet exported."""
    connector.on_timer(_context())
