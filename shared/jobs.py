"""SendGrid's jobs: a run's own (polled to its final status) and every job of an account the product knows about.

SendGrid applies upserts and imports asynchronously, minutes later in production. A contact whose upsert job is
still pending is invisible to search, so a removal or deletion that looked it up then would find nothing and call it
gone. Rule: before any removal or deletion step, every job of that SendGrid account that the product knows about is
final (`settle_account`). Runs note themselves under their account (`state.mark_open_jobs`) when their first job is
accepted, and the note goes when all their jobs are final, whatever the run's own status (a run that failed on a 403
after 8,000 contacts were accepted still has pending jobs).

An account is a SendGrid API key's secret name and region: what `Destination.api_key_secret` and `region` say.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .config import Destination
from .record import Job, RunRecord, Status
from .redaction import redact
from .sendgrid import JobStatus, SendGridClient
from .state import StateStore

log = logging.getLogger(__name__)

FINAL_JOB = ("completed", "errored", "failed")
POLL_CONCURRENCY = 8  # job-status calls at once (the client's connection pool holds 8)


class PollSettings(Protocol):
    poll_interval: float
    wait_timeout: float


def account_of(dest: Destination) -> str:
    """A short stable name for the SendGrid account a destination writes to (its key's secret and its region)."""
    return hashlib.blake2b(f"{dest.region}\n{dest.api_key_secret}".encode(), digest_size=8).hexdigest()


def statuses(client: SendGridClient, job_ids: list[str]) -> list[JobStatus]:
    """GET each job's status, POLL_CONCURRENCY calls at a time, in job_ids' order. One call after another, a sweep
    over a 5M-contact run's 188 jobs took 188 round trips (47 s at 250 ms each)."""
    if len(job_ids) <= 1:
        return [client.import_status(i) for i in job_ids]
    with ThreadPoolExecutor(min(POLL_CONCURRENCY, len(job_ids)), thread_name_prefix="job-status") as pool:
        return list(pool.map(client.import_status, job_ids))


def pending(record: RunRecord) -> list[Job]:
    return [j for j in record.jobs if j.status not in FINAL_JOB]


def refresh(record: RunRecord, client: SendGridClient) -> list[Job]:
    """Ask SendGrid once for every open job of the run and note the answers; returns the jobs still open."""
    open_jobs = pending(record)
    for job, status in zip(open_jobs, statuses(client, [j.id for j in open_jobs]), strict=True):
        job.status, job.results = status.status, status.results
        if job.status in ("errored", "failed") and status.errors_url:
            job.errors_url = status.errors_url
            job.errors = [redact(x) for x in client.errors_head(status.errors_url)]
    return pending(record)


def poll_jobs(record: RunRecord, client: SendGridClient, settings: PollSettings, *, wait: bool,
              until: float | None = None, on_wait: Callable[[], None] | None = None) -> bool:
    """Update the run's jobs from SendGrid; with wait, until every job is final (or `until`, a monotonic time, or
    settings.wait_timeout). Returns whether all are final. Sets counts.not_applied once they are."""
    end = time.monotonic() + settings.wait_timeout
    if until is not None:
        end = min(end, until)
    interval = min(settings.poll_interval, 0.25)
    while (still := refresh(record, client)) and wait and time.monotonic() < end:
        if on_wait is not None:
            on_wait()
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
        interval = min(interval * 1.5, settings.poll_interval)
    if still:
        return False
    # what SendGrid accepted but did not apply: errored rows, and every contact of a failed job
    record.counts.not_applied = sum(j.contacts if j.status == "failed" else int((j.results or {}).get("errored_count")
                                                                                 or 0) for j in record.jobs)
    return True


def outcome(record: RunRecord) -> tuple[Status, str | None]:
    """The status a run's final jobs give it (and an error): every job failed -> failed; any error or any file that
    could not be read -> completed_with_errors; else completed."""
    job_statuses = {j.status for j in record.jobs}
    if job_statuses and job_statuses <= {"failed"}:
        return Status.FAILED, "every SendGrid job failed; see jobs[].errors"
    if job_statuses - {"completed"} or record.file_errors:
        return Status.COMPLETED_WITH_ERRORS, None
    return Status.COMPLETED, None


def settle_account(state: StateStore, client: SendGridClient, account: str, settings: PollSettings, *,
                   until: float | None = None, on_wait: Callable[[], None] | None = None) -> list[str]:
    """Wait until every job the product knows of in the account is final (until `until` or settings.wait_timeout):
    other runs' jobs are polled read-only (their own records are brought up to date when they are finished), and a
    run whose jobs are all final loses its note. Returns the ids of runs whose jobs are still open ([] = settled)."""
    end = time.monotonic() + settings.wait_timeout
    if until is not None:
        end = min(end, until)
    interval = min(settings.poll_interval, 0.25)
    while True:
        waiting = []
        for run_id in state.runs_with_open_jobs(account):
            stored = state.peek_run(run_id)
            if stored is None or not refresh(RunRecord.from_json(stored), client):
                state.unmark_open_jobs(account, run_id)
            else:
                waiting.append(run_id)
        if not waiting or time.monotonic() >= end:
            if waiting:
                log.info("account %s: jobs of run(s) %s are not final yet", account, ", ".join(waiting))
            return waiting
        if on_wait is not None:
            on_wait()
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
        interval = min(interval * 1.5, settings.poll_interval)


def unconfirmed(record: RunRecord, client: SendGridClient, part_emails: Callable[[Job], Iterable[str]]
                ) -> Iterator[str]:
    """The emails of a run's final jobs that SendGrid did not confirm: every contact of a failed job (and of an
    errored one whose errors file cannot be read or names no emails), and the rows an errors file names."""
    for job in record.jobs:
        if job.status == "completed":
            continue
        named = client.errored_emails(job.errors_url) if job.status == "errored" and job.errors_url else None
        yield from (named if named is not None else part_emails(job))
