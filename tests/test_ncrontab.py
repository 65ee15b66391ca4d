"""Six-field NCRONTAB schedules (shared/ncrontab.py): the answers NCrontab, the library Azure Functions' timer uses,
gives. The evaluation cases are modelled on NCrontab's own CrontabScheduleTests (atifaziz/NCrontab), five-field
ones given a seconds field of 0."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.ncrontab import CronError, parse


def _t(text: str) -> datetime:
    """'dd/mm/yyyy hh:mm:ss', as NCrontab's tests write times."""
    return datetime.strptime(text, "%d/%m/%Y %H:%M:%S").replace(tzinfo=UTC)


EVALUATIONS = [  # (start, expression, the next occurrence after start)
    ("01/01/2003 00:00:00", "0 * * * * *", "01/01/2003 00:01:00"),
    ("01/01/2003 23:59:00", "0 * * * * *", "02/01/2003 00:00:00"),
    ("31/12/2003 23:59:00", "0 * * * * *", "01/01/2004 00:00:00"),
    ("28/02/2003 23:59:00", "0 * * * * *", "01/03/2003 00:00:00"),
    ("28/02/2004 23:59:00", "0 * * * * *", "29/02/2004 00:00:00"),
    ("01/01/2003 00:00:00", "45 * * * * *", "01/01/2003 00:00:45"),
    ("01/01/2003 00:00:48", "45-47,48,49 * * * * *", "01/01/2003 00:00:49"),
    ("01/01/2003 00:00:49", "45-47,48,49 * * * * *", "01/01/2003 00:01:45"),
    ("01/01/2003 00:00:02", "2/5 * * * * *", "01/01/2003 00:00:07"),
    ("01/01/2003 00:00:57", "2/5 * * * * *", "01/01/2003 00:01:02"),
    ("24/02/2021 09:50:35", "* 0-1 10 * * *", "24/02/2021 10:00:00"),
    ("24/02/2021 09:50:35", "* 55 * * * *", "24/02/2021 09:55:00"),
    ("01/01/2003 00:49:30", "6 45-47,48,49 * * * *", "01/01/2003 01:45:06"),
    ("01/01/2003 00:57:30", "9 2/5 * * * *", "01/01/2003 01:02:09"),
    ("20/12/2003 10:00:00", "0 * 3/4 * * *", "20/12/2003 11:00:00"),
    ("07/01/2003 00:00:00", "0 30 * 1 * *", "01/02/2003 00:30:00"),
    ("10/07/2003 00:00:00", "0 * * 30,31 * *", "30/07/2003 00:00:00"),
    ("31/01/2000 00:00:00", "0 0 0 15,30,31 * *", "15/02/2000 00:00:00"),
    ("30/04/2000 00:00:00", "0 0 0 15,30,31 * *", "15/05/2000 00:00:00"),
    ("01/12/2003 05:00:00", "0 10 * * 6 *", "01/06/2004 00:10:00"),
    ("01/07/2002 05:00:00", "0 10 * * February,April-Jun *", "01/02/2003 00:10:00"),
    ("11/03/1988 14:23:00", "0 20 * * january,FeB,Mar,april,May,JuNE,July,Augu,SEPT-October,Nov,DECEM *",
     "11/03/1988 15:20:00"),
    ("26/06/2003 10:00:00", "0 30 6 * * sunday", "29/06/2003 06:30:00"),
    ("24/06/2003 12:01:00", "0 1 12 * * 2", "01/07/2003 12:01:00"),
    ("01/01/2003 00:00:00", "0 * * * * Mon", "06/01/2003 00:00:00"),
    # the day of the month AND the day of the week (classic cron would take 01/02/2003, a Saturday)
    ("01/01/2003 12:00:00", "0 45 16 1 * Mon", "01/09/2003 16:45:00"),
    ("01/01/2000 12:00:00", "0 1 12 29 2 *", "29/02/2000 12:01:00"),
    ("29/02/2000 12:01:00", "0 1 12 29 2 *", "29/02/2004 12:01:00"),
    ("29/02/2004 12:01:00", "0 1 12 28 2 *", "28/02/2005 12:01:00"),
    ("01/01/2000 14:40:00", "0 40 14/1 * * *", "01/01/2000 15:40:00"),
    ("01/01/2024 00:00:00", "0 0 0 29 2 Mon", "29/02/2044 00:00:00"),  # Feb 29 on a Monday: 20 years away
    ("02/12/2026 12:00:00", "0 */5 * * * *", "02/12/2026 12:05:00"),
]


@pytest.mark.parametrize("start,expression,expected", EVALUATIONS, ids=range(len(EVALUATIONS)))
def test_next_occurrence_is_ncrontabs(start: str, expression: str, expected: str) -> None:
    schedule = parse(expression)
    found = schedule.next_after(_t(start))
    assert found == _t(expected) and schedule.matches(found)


def test_an_occurrence_is_strictly_after_and_the_first_one() -> None:
    schedule = parse("0 0 6 * * *")
    six = _t("02/12/2026 06:00:00")
    assert schedule.next_after(six) == _t("03/12/2026 06:00:00")  # not `six` itself
    assert schedule.next_after(six - timedelta(microseconds=1)) == six
    moment, found = _t("01/01/2026 00:00:00"), []
    for _ in range(3):
        moment = parse("0 0 0 * * Sat,Sun").next_after(moment)
        found.append(moment)
    assert found == [_t("03/01/2026 00:00:00"), _t("04/01/2026 00:00:00"), _t("10/01/2026 00:00:00")]


def test_naive_and_other_zones_are_read_as_the_same_instant() -> None:
    schedule = parse("0 0 6 * * *")
    eastern = datetime(2026, 12, 2, 0, 30, tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    assert schedule.next_after(eastern) == _t("02/12/2026 06:00:00")
    assert schedule.next_after(datetime(2026, 12, 2, 5, 0)) == _t("02/12/2026 06:00:00")


def test_whitespace_between_fields_does_not_matter() -> None:
    assert parse("  0  0 6 * *   *  ").expression == "0 0 6 * * *"


BAD = [
    ("", "has 0 field(s)"),
    ("0 6 * * *", "five-field cron expression has no seconds"),
    ("00:05:00", "a time span"),
    ("0 0 6 * * * *", "has 7 field(s)"),
    ("60 * * * * *", "second field: 60 is outside 0-59"),
    ("0 0 24 * * *", "hour field: 24 is outside 0-23"),
    ("0 0 0 0 * *", "day field: 0 is outside 1-31"),
    ("0 0 0 * 13 *", "month field: 13 is outside 1-12"),
    ("0 0 0 * * 7", "day-of-week field: 7 is outside 0-6"),
    ("0 0 0 * * Mo", "day-of-week field: 'Mo' is not a day-of-week name"),
    ("0 0 0 * Foo *", "month field: 'Foo' is not a month name"),
    ("0 x * * * *", "minute field: 'x' is not a number"),
    ("0 */0 * * * *", "minute field: the step in '*/0' must be a whole number of 1 or more"),
    ("0 5/ * * * *", "minute field: the step in '5/' must be"),
    ("0 5-2 * * * *", "minute field: the range '5-2' runs backwards"),
    ("0 1,,2 * * * *", "minute field: '1,,2' has an empty element"),
    ("0 \u0663 * * * *", "minute field: '\u0663' is not a number"),  # an Arabic-Indic 3: ASCII digits only
    ("0 0 0 30 2 *", "names no date that exists"),
    ("0 0 0 31 4,6,9,11 *", "names no date that exists"),
]


@pytest.mark.parametrize("expression,message", BAD, ids=range(len(BAD)))
def test_bad_expressions_say_which_field_and_why(expression: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse(expression)
    assert message in str(caught.value)


def test_not_a_string_is_refused() -> None:
    with pytest.raises(CronError, match="must be a string"):
        parse(5)  # type: ignore[arg-type]
