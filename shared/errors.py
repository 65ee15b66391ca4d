"""One small error hierarchy. Row-level problems are values (rejections), never exceptions."""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error this product raises on purpose. Messages never contain secrets."""


class ConfigError(ConnectorError):
    """The destinations file, a destination or an app setting is invalid. Names the file, destination and field."""

    def __init__(self, message: str, *, file: str | None = None, destination: str | None = None,
                 field: str | None = None) -> None:
        parts = [p for p in (file and f"{file}", destination and f"destination '{destination}'",
                             field and f"field '{field}'") if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)
        self.file, self.destination, self.field = file, destination, field


class SourceError(ConnectorError):
    """A source file or folder cannot be read at all (a bad row is a rejection, not this)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}, line {line}" if file and line else (file or "")
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.line = file, line


class ExportIncomplete(SourceError):
    """The export is incomplete or still being written (an empty model.json, or one that is not complete JSON).
    Nothing of it was read; the same export read again later may be whole."""


class SecretError(ConnectorError):
    """The API key cannot be obtained (missing, unresolved Key Vault reference, vault refused)."""


class StateError(ConnectorError):
    """The state store cannot be read or written."""


class LeaseUnavailable(StateError):
    """Another run holds this destination; the caller waits or defers, never interleaves."""


class RunRefused(ConnectorError):
    """A destination may not run as configured (no consent, disabled, over max_profiles). Nothing was sent."""


class SendGridError(ConnectorError):
    """SendGrid answered something we cannot use, after the retries the policy allows."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(SendGridError):
    """401/403: bad, revoked or rotated key, missing scope, or a temporary block. Never retried blindly."""


class RateLimited(SendGridError):
    """429 that outlasted the policy's patience."""


class PayloadRejected(SendGridError):
    """400/413 for a request that cannot be fixed by dropping named invalid addresses."""


class TransientError(SendGridError):
    """5xx, timeouts, connection errors that outlasted the retry budget; the run stops resumable."""


class DeadlineReached(ConnectorError):
    """Internal signal: the run's deadline is near; it checkpoints and stops as 'interrupted'."""
