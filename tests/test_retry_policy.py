"""The retry policy on its own: a pure value (no HTTP, no clock of its own). How the client follows it against the
sandbox is in test_sendgrid_client.py."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from shared.sendgrid import Attempt, RetryPolicy, Trouble

NOW = 1_800_000_000.0  # a fixed wall clock: waits are computed from it, never read from the machine


class TopRandom(random.Random):
    """Jitter at the top of its range: the backoff caps themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


def http_date(unix: float) -> str:
    return formatdate(unix, usegmt=True)


@pytest.mark.parametrize(("status", "trouble"), [
    (None, Trouble.FAILED), (500, Trouble.FAILED), (502, Trouble.FAILED), (503, Trouble.FAILED),
    (429, Trouble.RATE_LIMITED), (401, Trouble.UNAUTHORIZED),
    (400, None), (403, None), (404, None), (409, None), (413, None), (451, None),
])
def test_each_status_draws_on_its_own_budget_or_none(status: int | None, trouble: Trouble | None) -> None:
    assert RetryPolicy.trouble_of(status) is trouble


def test_a_final_status_cannot_be_counted_as_a_retry() -> None:
    with pytest.raises(ValueError, match="451"):
        RetryPolicy().increment(status=451, now=NOW, rng=random.Random(1))


def test_increment_returns_a_new_value_and_leaves_the_old_one_as_it_was() -> None:
    start = RetryPolicy(max_attempts=3, backoff_base=1.0)
    after = start.increment(error="timed out", now=NOW, rng=TopRandom())
    again = after.increment(status=503, now=NOW, rng=TopRandom())
    assert start.history == () and len(after.history) == 1
    assert again.history == (Attempt(Trouble.FAILED, None, "timed out", 1.0), Attempt(Trouble.FAILED, 503, None, 2.0))
    assert again.sleep_for() == 2.0 and again.new().history == () and again.new().max_attempts == 3


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0),
    (" 12 ", 12.0),
    ("0", 0.0),
    ("100000", 120.0),  # capped at max_single_wait
    ("9" * 400, 120.0),  # absurdly long, still a number of seconds: capped, not an error
    ("²", None),  # str.isdigit() says yes; float() would raise: not a number of seconds
    ("١٢", None),  # Arabic-Indic digits: not ASCII
    ("1.5", None),
    ("-1", None),
    ("soon", None),
    ("", None),
    (http_date(NOW + 30), 30.0),
    (http_date(NOW - 3600), 0.0),  # a date in the past: no wait
    (http_date(NOW + 86_400), 120.0),  # capped
    ("Fri, 15 Jan 2027 08:00:30 -0000", 30.0),  # "-0000", no zone known: read as UTC
])
def test_retry_after_is_ascii_seconds_or_an_http_date(value: str, expected: float | None) -> None:
    got = RetryPolicy(max_single_wait=120.0).parse_retry_after(value, NOW)
    assert got == (None if expected is None else min(max(expected, 0.0), 120.0))


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "7", "X-RateLimit-Reset": str(int(NOW) + 30)}, 7.0),  # Retry-After wins
    ({"Retry-After": "0"}, 0.05),  # a 429 is never retried without a pause
    ({"Retry-After": http_date(NOW - 60)}, 0.05),
    ({"Retry-After": "²", "X-RateLimit-Reset": str(int(NOW) + 30)}, 30.05),  # unusable: the reset instead
    ({"X-RateLimit-Reset": str(int(NOW) + 30)}, 30.05),
    ({"X-RateLimit-Reset": str(int(NOW) - 30)}, 0.05),
    ({"X-RateLimit-Reset": str(int(NOW) + 500)}, 120.0),
    ({"X-RateLimit-Reset": "nan"}, 1.0),  # float("nan") would make a NaN wait
    ({"X-RateLimit-Reset": "inf"}, 1.0),
    ({}, 1.0),
])
def test_rate_limit_wait(headers: dict[str, str], expected: float) -> None:
    assert RetryPolicy(max_single_wait=120.0).rate_limit_wait(headers, NOW) == pytest.approx(expected)


def test_a_429_waits_what_it_is_told_and_spends_seconds_not_attempts() -> None:
    retry = RetryPolicy(max_attempts=1, max_rate_limit_wait=20.0)
    for waited in (6.0, 12.0, 18.0):
        retry = retry.increment(status=429, headers={"Retry-After": "6"}, now=NOW, rng=random.Random(1))
        assert not retry.is_exhausted() and retry.waited(Trouble.RATE_LIMITED) == waited
    assert retry.increment(status=429, headers={"Retry-After": "6"}, now=NOW, rng=random.Random(1)).is_exhausted()


def test_errors_spend_attempts_not_the_rate_limit_seconds() -> None:
    retry = RetryPolicy(max_attempts=3, backoff_base=10.0, backoff_max=60.0, max_rate_limit_wait=1.0)
    retry = retry.increment(status=503, now=NOW, rng=TopRandom())
    retry = retry.increment(error="connection failed", now=NOW, rng=TopRandom())
    assert [a.wait for a in retry.history] == [10.0, 20.0] and not retry.is_exhausted()
    assert retry.increment(status=500, now=NOW, rng=TopRandom()).is_exhausted()


def test_a_rate_limit_between_errors_neither_resets_nor_spends_the_attempts() -> None:
    retry = RetryPolicy(max_attempts=2, backoff_base=0.5)
    retry = retry.increment(status=503, now=NOW, rng=TopRandom())
    retry = retry.increment(status=429, headers={"Retry-After": "1"}, now=NOW, rng=TopRandom())
    assert not retry.is_exhausted()
    retry = retry.increment(status=503, now=NOW, rng=TopRandom())
    assert retry.is_exhausted() and retry.history[-1].wait == 1.0  # the second error's backoff is the second step


def test_a_503_that_says_when_to_come_back_is_believed_within_the_cap() -> None:
    retry = RetryPolicy(max_single_wait=60.0).increment(status=503, headers={"Retry-After": "4"}, now=NOW,
                                                       rng=TopRandom())
    assert retry.sleep_for() == 4.0
    far = RetryPolicy(max_single_wait=60.0).increment(status=503, headers={"Retry-After": "3600"}, now=NOW,
                                                     rng=TopRandom())
    assert far.sleep_for() == 60.0


def test_a_401_reads_the_key_again_once_per_call() -> None:
    retry = RetryPolicy().increment(status=401, now=NOW, rng=random.Random(1))
    assert not retry.is_exhausted() and retry.sleep_for() == 0.0
    assert retry.increment(status=401, now=NOW, rng=random.Random(1)).is_exhausted()
    assert not RetryPolicy(max_key_refreshes=2).increment(status=401, now=NOW, rng=random.Random(1)).increment(
        status=401, now=NOW, rng=random.Random(1)).is_exhausted()


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=3.0)
    assert [policy.backoff(n, TopRandom()) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
