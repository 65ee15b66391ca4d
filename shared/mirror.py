"""Mirror mode's SendGrid side: the removal guard rail, and removing or deleting contacts named by email.

Emails become contact ids through POST /v3/marketing/contacts/search/emails (100 a call); ids are then removed from
a list (DELETE /v3/marketing/lists/{id}/contacts) or, for a purge or an erasure, deleted from the account (DELETE
/v3/marketing/contacts). Removing from a list is the default on purpose: deleting and re-adding a contact costs
contact allowance. Contacts SendGrid no longer knows are counted (`not_found`), never errors.

Streams are processed chunk by chunk (bounded memory at any size) and `on_progress` reports the absolute position
after each chunk, so a caller can checkpoint and resume with `start`. Nothing here logs an email address: logs
and reports name a person by `erasure_hash` only.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from . import limits
from .errors import PayloadRejected
from .sendgrid import InvalidContacts, SearchHit, SendGridClient

log = logging.getLogger(__name__)

JOBS_KEPT = 100  # counts keep the most recent job ids only (a 5-million removal makes tens of thousands of jobs)
SETTING = "max_removal_fraction"

Progress = Callable[[int, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------------- guard rail


@dataclass(frozen=True)
class RemovalPlan:
    to_remove: int
    previous: int
    current: int
    allowed: bool
    reason: str | None


def _fraction(value: float) -> Fraction:
    """The setting as the decimal the admin wrote (0.7 is 7/10, not the binary float just below it)."""
    return Fraction(repr(float(value)))


def plan_removal(previous_count: int, current_count: int, removal_count: int, max_fraction: float) -> RemovalPlan:
    """Decide whether a mirror run may remove `removal_count` of the `previous_count` contacts last synced.

    Refused (nothing is removed, the run fails with `reason`): more than `max_fraction` of the previous snapshot, or
    an empty export while the previous snapshot is not empty, unless max_fraction is 1.0. Exactly the fraction is
    allowed. ValueError for impossible numbers (a caller bug, not a data problem)."""
    if not 0 < max_fraction <= 1:
        raise ValueError(f"{SETTING} must be greater than 0 and at most 1, not {max_fraction!r}")
    if min(previous_count, current_count, removal_count) < 0 or removal_count > previous_count:
        raise ValueError(f"impossible removal plan: remove {removal_count} of {previous_count} "
                         f"(current {current_count})")
    limit = _fraction(max_fraction)
    allowed_max = int(previous_count * limit)  # floor
    share = f"{removal_count / previous_count:.1%}" if previous_count else "0%"

    def plan(allowed: bool, reason: str | None = None) -> RemovalPlan:
        return RemovalPlan(removal_count, previous_count, current_count, allowed, reason)

    if removal_count == 0:
        return plan(True)
    if limit == 1:
        return plan(True)
    if current_count == 0:
        return plan(False, (
            f"the export has no valid contacts, but {previous_count:,} were last synced to the list: mirroring it "
            f"would empty the list, so nothing was removed. Check the export; to empty the list on purpose set "
            f"{SETTING} to 1.0 (it is {max_fraction:g})"))
    if removal_count > allowed_max:
        return plan(False, (
            f"this run would remove {removal_count:,} of the {previous_count:,} contacts last synced to the list "
            f"({share}), more than {SETTING} {max_fraction:g} allows (at most {allowed_max:,}), so nothing was "
            f"removed. Check the export; if the drop is real, raise {SETTING} (1.0 allows any removal)"))
    return plan(True)


# ------------------------------------------------------------------------------------------- removal and deletion


def _new_counts(done_key: str, carried: Mapping[str, Any] | None) -> dict[str, Any]:
    names = ("requested", done_key, "not_found", "not_in_list", "invalid", "job_count")
    counts: dict[str, Any] = dict.fromkeys(names, 0) | {"jobs": []}
    if carried:
        for name in names:
            counts[name] = int(carried.get(name, 0) or 0)
        counts["jobs"] = [str(j) for j in carried.get("jobs", [])][-JOBS_KEPT:]
    return counts


def _lookup(client: SendGridClient, chunk: Sequence[str]) -> tuple[dict[str, SearchHit], int]:
    """(the contacts found, by email; how many emails SendGrid refused to search) for at most 100 emails.

    Addresses the search refuses as invalid (it is stricter than upserts, e.g. on length) cannot be looked up, so
    they are counted and left out instead of failing the whole run."""
    pending = [e.lower() for e in chunk]
    invalid = 0
    while pending:
        try:
            found = client.search_contacts(pending)
        except InvalidContacts as exc:
            named = exc.emails
            keep = [e for e in pending if e not in named]
            if len(keep) == len(pending):
                raise
            invalid += len(pending) - len(keep)
            pending = keep
            continue
        return {e: found[e] for e in pending if e in found}, invalid
    return {}, invalid


def _targets(hits: Mapping[str, SearchHit], list_id: str | None) -> list[str]:
    """Distinct ids to act on: every contact found, or (removal from a list) those still on that list."""
    return list(dict.fromkeys(h.id for h in hits.values() if list_id is None or list_id in h.list_ids))


def _by_email(
    client: SendGridClient,
    emails: Iterable[str],
    act: Callable[[list[str]], list[str]],
    done_key: str,
    *,
    list_id: str | None = None,
    start: int,
    on_progress: Progress | None,
    counts: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if start < 0:
        raise ValueError("start must not be negative")
    result = _new_counts(done_key, counts)
    iterator = iter(emails)
    done = sum(1 for _ in itertools.islice(iterator, start))  # skipped without any request
    while chunk := list(itertools.islice(iterator, limits.MAX_SEARCH_EMAILS)):
        hits, invalid = _lookup(client, chunk)
        ids = _targets(hits, list_id)
        jobs: list[str] = []
        if ids:
            try:
                jobs = act(ids)
            except PayloadRejected as exc:
                if exc.status != 404:
                    raise
                # SendGrid refuses unknown ids: a contact was deleted between search and removal. Look the chunk
                # up again and retry once; a second 404 (say, the list is gone) is the caller's problem.
                log.info("removal answered 404; looking the chunk up again")
                hits, invalid = _lookup(client, chunk)
                ids = _targets(hits, list_id)
                jobs = act(ids) if ids else []
        if ids:
            result[done_key] += len(ids)
            result["job_count"] += len(jobs)
            result["jobs"] = (result["jobs"] + [j for j in jobs if j])[-JOBS_KEPT:]
        result["requested"] += len(chunk)
        result["not_found"] += len(chunk) - len(hits) - invalid
        result["not_in_list"] += len(hits) - len(ids) if list_id is not None else 0
        result["invalid"] += invalid
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, result)
    return result


def remove_emails(
    client: SendGridClient,
    list_id: str,
    emails: Iterable[str],
    *,
    start: int = 0,
    on_progress: Progress | None = None,
    counts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Remove the contacts with these emails (a sorted stream, e.g. a snapshot diff) from a list, 100 at a time.

    The first `start` emails are skipped without a request (resume). After each chunk `on_progress(done, counts)` is
    called with the absolute position in the stream (the next `start`) and the running counts (a live dict: serialise
    it, don't keep it). `counts` carries an interrupted attempt's counts so the totals span both. Returns
    {"requested", "removed", "not_found", "not_in_list", "invalid", "jobs" (the last JOBS_KEPT job ids),
    "job_count"}: only contacts still on the list are asked to be removed ("removed"); a pass that removes nobody
    confirms that every email of the stream is off the list (SendGrid applies removals later: see `passes`)."""
    return _by_email(client, emails, lambda ids: client.remove_from_list(list_id, ids), "removed", list_id=list_id,
                     start=start, on_progress=on_progress, counts=counts)


def delete_emails(
    client: SendGridClient,
    emails: Iterable[str],
    *,
    start: int = 0,
    on_progress: Progress | None = None,
    counts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Delete the contacts with these emails from the account entirely (purge with deletion, erasure): the same as
    `remove_emails`, with "deleted" for "removed". Deleted contacts count against the allowance if they come back."""
    return _by_email(client, emails, client.delete_contacts, "deleted", start=start, on_progress=on_progress,
                     counts=counts)


# ------------------------------------------------------------------------------------------------- confirmed passes

PASS_WAIT_FIRST, PASS_WAIT_MAX = 1.0, 60.0  # between passes: SendGrid applies removals and deletions minutes later
Act = Callable[..., dict[str, Any]]  # remove_emails or delete_emails with their client (and list) bound


def new_passes() -> dict[str, Any]:
    """The durable state of `until_confirmed`, kept in a run's checkpoint."""
    return {"pass": 1, "done": 0, "counts": None, "first": None}


def until_confirmed(act: Act, done_key: str, emails: Callable[[], Iterable[str]], passes: dict[str, Any], *,
                    checkpoint: Callable[[], None], until: float, pause: Callable[[float], None] = time.sleep) -> bool:
    """Passes of `act` over the same emails until one acts on nobody: SendGrid applies removals and deletions later,
    so only a pass that finds nobody left on the list (or in the account) confirms them; until then each pass asks
    again for those still there. `passes` (see new_passes) moves after every chunk and every pass, then
    `checkpoint()` saves it (it may raise to stop: a deadline, a lost lease). True once confirmed; False when the next
    pass would start after `until` (the caller goes on later from `passes`)."""
    wait = PASS_WAIT_FIRST

    def progress(done: int, counts: dict[str, Any]) -> None:
        passes.update(done=done, counts=dict(counts))
        checkpoint()

    while True:
        counts = act(emails(), start=passes["done"], on_progress=progress, counts=passes["counts"])
        if passes["pass"] == 1:
            passes["first"] = dict(counts)
        passes["last"] = counts[done_key]
        if counts[done_key] == 0:
            passes["confirmed"] = True
            checkpoint()
            return True
        passes.update({"pass": passes["pass"] + 1, "done": 0, "counts": None})
        checkpoint()
        if time.monotonic() + wait > until:
            return False
        pause(wait)
        wait = min(wait * 2, PASS_WAIT_MAX)


# ---------------------------------------------------------------------------------------------------------- erasure


def erasure_hash(email: str, salt: bytes) -> str:
    """What logs and reports say instead of an address: a keyed BLAKE2b of the normalised email (32 hex digits).
    Stable for one salt (an erasure can be traced across runs); without the salt it cannot be reversed by guessing."""
    if not salt:
        raise ValueError("erasure_hash needs a non-empty salt: an unsalted hash of an email is easy to reverse")
    key = salt if len(salt) <= hashlib.blake2b.MAX_KEY_SIZE else hashlib.blake2b(salt).digest()
    normalised = email.strip().lower().encode()
    return hashlib.blake2b(normalised, key=key, digest_size=16, person=b"sg-erasure").hexdigest()


__all__ = ["JOBS_KEPT", "RemovalPlan", "delete_emails", "erasure_hash", "new_passes", "plan_removal", "remove_emails",
           "until_confirmed"]
