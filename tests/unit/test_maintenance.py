"""Maintenance windows and blackouts: validation (file:line errors), merging, DST, scopes, calendars, the CLI."""
from __future__ import annotations

import typing
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import SpecInvalid
from models.load import load
from models.maintenance import DesiredMaintenance, DesiredWindow, StepAction, schedule_of
from models.resolve import resolve
from models.windows import Schedule, WindowRule, _occurrences, kind_of, least_availability, to_utc, zone

from .conftest import edit

pytestmark = pytest.mark.unit
UTC = timezone.utc
STORE = "clusters/metal.yaml"
STORE_ANCHOR = "    timezone: Europe/London\n"


def problems(files):
    with pytest.raises(SpecInvalid) as e:
        load(files)
    return [str(p) for p in e.value.problems]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def local(ts_: float, tz: str) -> datetime:
    return datetime.fromtimestamp(ts_, UTC).astimezone(ZoneInfo(tz))


def with_store(example_files, block: str) -> dict:
    """The example fleet with edge-store-01's maintenance block replaced by ``block`` (lines under `maintenance:`)."""
    text = example_files[STORE]
    start = text.index("  maintenance:")
    end = text.index("---", start)
    files = dict(example_files)
    files[STORE] = text[:start] + "  maintenance:\n" + block + text[end:]
    return files


def store_line(files, needle: str) -> int:
    return next(i for i, line in enumerate(files[STORE].splitlines(), 1) if needle in line)


# --------------------------------------------------------------------------- validation

def test_example_fleet_windows_resolve(example_defs):
    store = resolve(example_defs, "edge-store-01").maintenance
    assert store.timezone == "Europe/London" and store.windows[0].rrule == "FREQ=DAILY"
    assert store.calendars[0].file.endswith("calendars/trading.ics")
    prod = resolve(example_defs, "dc1-web-prod").maintenance
    assert prod.windows[0].rrule == "FREQ=WEEKLY;BYDAY=SA,SU" and prod.blackouts[0].scope == "minor-upgrades"
    assert resolve(example_defs, "us-web-staging").maintenance is None  # the demo's clusters: always open


@pytest.mark.parametrize("window, message", [
    ('{rrule: "FREQ=WEEKLY;BYDAY=XX", start: "02:00", duration: 4h}', "not a valid RFC 5545 RRULE: invalid 'BYDAY': XX"),
    ('{rrule: "BYDAY=SA", start: "02:00", duration: 4h}', "not a valid RFC 5545 RRULE: FREQ is required"),
    ('{rrule: "FREQ=HOURLY", start: "02:00", duration: 4h}', "FREQ=HOURLY: a window recurs DAILY, WEEKLY, MONTHLY or YEARLY"),
    ('{rrule: "FREQ=DAILY;BYHOUR=3", start: "02:00", duration: 4h}', "BYHOUR is not allowed"),
    ('{rrule: "FREQ=WEEKLY", start: "02:00", duration: 4h}', "FREQ=WEEKLY without BYDAY depends on the day it counts from"),
    ('{rrule: "FREQ=DAILY;INTERVAL=2", start: "02:00", duration: 4h}', "COUNT and INTERVAL>1 count from a first day"),
])
def test_bad_rrule_is_located(example_files, window, message):
    files = with_store(example_files, f"    timezone: Europe/London\n    windows: [{window}]\n")
    (p,) = problems(files)
    line = store_line(files, "windows: [")
    assert p.startswith(f"{STORE}:{line}: spec.maintenance.windows[0].rrule: ") and message in p, p


def test_unknown_timezone_is_located(example_files):
    files = edit(example_files, STORE, STORE_ANCHOR, "    timezone: Europe/Londn\n")
    (p,) = problems(files)
    assert p == f"{STORE}:{store_line(files, 'Londn')}: spec.maintenance.timezone: unknown timezone 'Europe/Londn' " \
                "(an IANA name such as Europe/Berlin)"


@pytest.mark.parametrize("tz, hint", [("europe/london", "did you mean Europe/London?"), ("+01:00", "not an offset"),
                                      ("UTC+2", "not an offset")])
def test_timezone_hints(example_files, tz, hint):
    files = edit(example_files, STORE, STORE_ANCHOR, f'    timezone: "{tz}"\n')
    (p,) = problems(files)
    assert "spec.maintenance.timezone: unknown timezone" in p and hint in p


@pytest.mark.parametrize("duration, message", [("0h", "'0h': must be longer than zero"),
                                               ("-2h", "'-2h' is not a duration like 4h"),
                                               ("4 hours", "is not a duration")])
def test_zero_or_negative_duration(example_files, duration, message):
    files = edit(example_files, STORE, "duration: 4h}", f'duration: "{duration}"}}')
    (p,) = problems(files)
    assert p.startswith(f"{STORE}:{store_line(files, 'windows:')}: spec.maintenance.windows[0].duration: ") and message in p


def test_unquoted_start_time_gets_a_hint(example_files):
    files = edit(example_files, STORE, 'start: "02:00"', "start: 22:00")
    (p,) = problems(files)
    assert "spec.maintenance.windows[0].start: must be a string \"HH:MM\": quote it (YAML reads 22:00 as the number 1320)" in p


def test_window_below_minimum_availability(example_files):
    files = edit(example_files, STORE, "rrule: FREQ=DAILY, start: \"02:00\", duration: 4h",
                 'rrule: "FREQ=WEEKLY;BYDAY=SU", start: "02:00", duration: 4h')
    (p,) = problems(files)
    assert p.startswith(f"{STORE}:{store_line(files, 'windows:')}: spec.maintenance.windows: windows must give at least "
                        "48h in any 32d (the minimum availability in the Policy); these give 16h in the 32d from")


def test_minimum_availability_is_a_policy_setting(example_files):
    files = edit(example_files, STORE, "rrule: FREQ=DAILY, start: \"02:00\", duration: 4h",
                 'rrule: "FREQ=WEEKLY;BYDAY=SU", start: "02:00", duration: 4h')
    files = edit(files, "policy.yaml", "minimumAvailability: {duration: 48h, per: 32d}",
                 "minimumAvailability: {duration: 16h, per: 32d}")
    load(files)


def test_blackout_end_before_start_and_offset(example_files):
    files = with_store(example_files, '    timezone: Europe/London\n    blackouts:\n'
                       '      - {name: a, from: "2026-12-24T00:00", to: "2026-12-23T00:00"}\n'
                       '      - {name: b, from: "2026-12-24T00:00+01:00", to: "2026-12-25"}\n')
    out = problems(files)
    assert any("spec.maintenance.blackouts[0].to: must be after from" in p for p in out), out
    assert any("spec.maintenance.blackouts[1].from: '2026-12-24T00:00+01:00': give a local time without an offset" in p
               for p in out), out


def test_scope_must_be_known(example_files):
    files = with_store(example_files, '    timezone: Europe/London\n    blackouts:\n'
                       '      - {name: a, from: "2026-12-24", to: "2026-12-25", scope: patch-upgrades}\n')
    (p,) = problems(files)
    assert "spec.maintenance.blackouts[0].scope" in p and "'all', 'minor-upgrades' or 'node-upgrades'" in p


def test_missing_calendar_and_bad_calendar(example_files):
    files = edit(example_files, STORE, "../calendars/trading.ics", "../calendars/nope.ics")
    (p,) = problems(files)
    assert p.startswith(f"{STORE}:{store_line(files, 'calendars:')}: spec.maintenance.calendars[0].file: no calendar "
                        "'../calendars/nope.ics' in the definitions (looked for calendars/nope.ics)")
    files = dict(example_files)
    files["calendars/trading.ics"] = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nSUMMARY:x\nDTSTART:2026xx\nEND:VEVENT\nEND:VCALENDAR\n"
    (p,) = problems(files)
    assert "spec.maintenance.calendars[0].file: calendars/trading.ics: event 'x': DTSTART" in p


def test_local_rule_without_a_timezone_is_located_at_the_cluster(example_files):
    files = edit(example_files, "policy.yaml", "    minimumAvailability:",
                 '    blackouts: [{name: Freeze, from: "2026-12-24", to: "2026-12-27"}]\n    minimumAvailability:')
    out = problems(files)
    assert any(p.startswith("clusters/aws.yaml:") and "spec.maintenance.timezone: no timezone for blackout 'Freeze' "
               "from Policy/fleet: set maintenance.timezone on the cluster, its model or the Policy" in p for p in out), out


def test_windows_and_always_open_exclusive(example_files):
    files = with_store(example_files, '    alwaysOpen: true\n    windows: [{rrule: FREQ=DAILY, start: "02:00", duration: 4h}]\n')
    (p,) = problems(files)
    assert "spec.maintenance: set windows or alwaysOpen: true, not both" in p


def test_step_actions_match_the_plan():
    from models.plan import Action

    assert typing.get_args(StepAction) == typing.get_args(Action)


# --------------------------------------------------------------------------- merging

FLEET_DEFAULTS = '''    timezone: Europe/Berlin
    windows: [{name: fleet-nights, rrule: FREQ=DAILY, start: "01:00", duration: 5h}]
    blackouts: [{name: Fleet freeze, from: "2026-12-24", to: "2026-12-27", reason: holidays}]
    minimumAvailability:'''


def test_merge_fleet_model_cluster(example_files):
    """timezone and windows: nearest wins; blackouts add up; a fleet rule without a zone is in the cluster's time."""
    files = edit(example_files, "policy.yaml", "    minimumAvailability:", FLEET_DEFAULTS)
    files = edit(files, "models/edge-small.yaml", "spec:\n", "spec:\n  maintenance:\n"
                 '    blackouts: [{name: Model freeze, from: "2026-11-01", to: "2026-11-02", scope: node-upgrades}]\n')
    defs = load(files)
    store = resolve(defs, "edge-store-01").maintenance  # its own zone and window
    assert (store.timezone, store.timezone_from) == ("Europe/London", "Cluster/edge-store-01")
    assert [w.name for w in store.windows] == ["overnight"] and store.windows_from == "Cluster/edge-store-01"
    assert [(b.name, b.timezone, b.origin) for b in store.blackouts] == [
        ("Fleet freeze", "Europe/London", "Policy/fleet"), ("Model freeze", "Europe/London", "ClusterModel/edge-small@1.0.0")]
    lab = resolve(defs, "edge-lab-01").maintenance  # nothing of its own: the fleet's window, in the fleet's zone
    assert lab.timezone == "Europe/Berlin" and lab.windows[0].name == "fleet-nights" and lab.windows_from == "Policy/fleet"
    assert len(lab.blackouts) == 2


def test_always_open_overrides_an_inherited_window(example_files):
    files = edit(example_files, "policy.yaml", "    minimumAvailability:", FLEET_DEFAULTS)
    files = with_store(files, "    alwaysOpen: true\n")
    d = resolve(load(files), "edge-store-01")
    s = schedule_of(d, load(files).files)
    assert d.maintenance.windows == [] and d.maintenance.windows_from == "Cluster/edge-store-01"
    assert s.decide(ts("2026-12-01T12:00:00+00:00")).allowed
    assert not s.decide(ts("2026-12-25T12:00:00+00:00")).allowed  # the fleet's blackout still applies


# --------------------------------------------------------------------------- DST

def test_gap_moves_to_the_first_instant_after_it():
    """Europe/Berlin skips 02:00-03:00 on 2026-03-29: a 02:30 start opens at 03:00 CEST (01:00 UTC)."""
    assert to_utc(datetime(2026, 3, 29, 2, 30), ZoneInfo("Europe/Berlin")) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    ny = to_utc(datetime(2026, 3, 8, 2, 15), ZoneInfo("America/New_York"))
    assert ny == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT
    syd = to_utc(datetime(2026, 10, 4, 2, 45), ZoneInfo("Australia/Sydney"))
    assert syd == datetime(2026, 10, 3, 16, 0, tzinfo=UTC)  # 03:00 AEDT


def test_repeat_takes_the_first_occurrence():
    """America/New_York passes 01:00-02:00 twice on 2026-11-01: 01:30 is the first (EDT, 05:30 UTC)."""
    assert to_utc(datetime(2026, 11, 1, 1, 30), ZoneInfo("America/New_York")) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    assert to_utc(datetime(2026, 10, 25, 2, 30), ZoneInfo("Europe/Berlin")) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert to_utc(datetime(2026, 4, 5, 2, 30), ZoneInfo("Australia/Sydney")) == datetime(2026, 4, 4, 15, 30, tzinfo=UTC)


def test_daily_window_across_both_changes_keeps_local_start_and_elapsed_duration():
    occ = _occurrences("FREQ=DAILY", "02:30", "4h", "Europe/Berlin", None, date(2026, 3, 27), 5)
    starts = {local(s, "Europe/Berlin").strftime("%m-%d %H:%M"): (e - s) / 3600 for s, e in occ}
    assert starts["03-28 02:30"] == 4 and starts["03-29 03:00"] == 4 and starts["03-30 02:30"] == 4


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Sydney"]
# the days each zone changes, both directions, in 2026 (and the days around them)
CHANGES = {"Europe/Berlin": [date(2026, 3, 29), date(2026, 10, 25)],
           "America/New_York": [date(2026, 3, 8), date(2026, 11, 1)],
           "Australia/Sydney": [date(2026, 4, 5), date(2026, 10, 4)]}


@settings(max_examples=150, deadline=None)
@given(tz=st.sampled_from(ZONES), which=st.integers(0, 1), offset=st.integers(-2, 2),
       hour=st.integers(0, 23), minute=st.sampled_from([0, 15, 30, 45]), hours=st.integers(1, 30))
def test_property_occurrences_across_dst(tz, which, offset, hour, minute, hours):
    """Around every change, both ways: each occurrence starts at its local start time (or the first instant after
    a gap), lasts exactly its duration, and windows longer than a day (spanning midnight) still come one per day."""
    day = CHANGES[tz][which] + timedelta(days=offset)
    start = f"{hour:02d}:{minute:02d}"
    occ = _occurrences("FREQ=DAILY", start, f"{hours}h", tz, None, day, 2)
    by_day = {}
    for s, e in occ:
        assert e - s == hours * 3600
        lt = local(s, tz)
        wall = datetime(lt.year, lt.month, lt.day, hour, minute)
        naive = lt.replace(tzinfo=None)
        if naive != wall:  # only in a gap: moved forward, to the instant the clocks jumped
            assert naive > wall and naive - wall <= timedelta(hours=1)
            assert local(s - 1, tz).utcoffset() != lt.utcoffset()
        else:  # a repeated wall time: the first of the two
            assert lt.fold == 0 or local(s - 3600, tz).replace(tzinfo=None) != naive
        by_day[lt.date()] = by_day.get(lt.date(), 0) + 1
    assert all(n == 1 for n in by_day.values())
    assert day in by_day


@settings(max_examples=100, deadline=None)
@given(tz=st.sampled_from(ZONES), which=st.integers(0, 1), hour=st.integers(0, 23), hours=st.integers(1, 10),
       probe=st.integers(-36, 60))
def test_property_decide_agrees_with_occurrences(tz, which, hour, hours, probe):
    """At any instant near a change, a change is allowed exactly when an occurrence covers it, and the next
    opening is the next occurrence's start."""
    day = CHANGES[tz][which]
    m = DesiredMaintenance(timezone=tz, windows=[DesiredWindow(timezone=tz, rrule="FREQ=DAILY", start=f"{hour:02d}:00",
                                                               duration=f"{hours}h", origin="test")])
    s = Schedule(m)
    at = datetime.combine(day, datetime.min.time(), UTC).timestamp() + probe * 1800
    occ = _occurrences("FREQ=DAILY", f"{hour:02d}:00", f"{hours}h", tz, None, datetime.fromtimestamp(at, UTC).date(), 3)
    inside = any(a <= at < b for a, b in occ)
    d = s.decide(at)
    assert d.allowed == inside
    if not inside:
        assert d.rule == "window" and d.next.start == min(a for a, _ in occ if a > at)


RULES = ["FREQ=DAILY", "FREQ=WEEKLY;BYDAY=SA,SU", "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH", "FREQ=MONTHLY;BYDAY=1SA,3SA",
         "FREQ=MONTHLY;BYMONTHDAY=1,15", "FREQ=WEEKLY;BYDAY=FR;UNTIL=20270115T000000"]


def _reference(rules, tz: str, at: float) -> tuple[bool, float]:
    """Straight from dateutil and zoneinfo, no cache and no shortcut: is ``at`` inside an occurrence of any
    rule, and when does the first occurrence after ``at`` start?"""
    from dateutil.rrule import rrulestr

    occ = []
    for rule, start, hours in rules:
        h, m = map(int, start.split(":"))
        for d in rrulestr(rule, dtstart=datetime(2025, 1, 1, h, m)).between(datetime(2025, 12, 1), datetime(2028, 3, 1)):
            s = to_utc(d, ZoneInfo(tz)).timestamp()
            occ.append((s, s + hours * 3600))
    return any(a <= at < b for a, b in occ), min((a for a, _ in occ if a > at), default=None)


@settings(max_examples=200, deadline=None)
@given(tz=st.sampled_from(ZONES + ["Europe/London", "Asia/Kolkata", "Pacific/Auckland", "America/Santiago"]),
       rules=st.lists(st.tuples(st.sampled_from(RULES), st.sampled_from(["00:00", "01:30", "02:30", "09:00", "22:45"]),
                                st.integers(1, 30)), min_size=1, max_size=3),
       probe=st.integers(0, 2 * 366 * 24 * 4))
def test_property_lazy_expansion_agrees_with_dateutil(tz, rules, probe):
    """The fast path (days expanded per rule and year, offsets per zone and day, occurrences made lazily, several
    windows joined) answers like a plain dateutil expansion: open or not, and the next opening's start (between
    two joined occurrences, the next start after the joined stretch)."""
    m = DesiredMaintenance(timezone=tz, windows=[DesiredWindow(timezone=tz, rrule=r, start=st_, duration=f"{h}h",
                                                               origin="t") for r, st_, h in rules])
    at = ts("2026-01-01T00:00:00+00:00") + probe * 900
    inside, nxt = _reference(rules, tz, at)
    d = Schedule(m).decide(at)
    assert d.allowed == inside
    if not inside:
        assert d.rule == "window" and (d.next.start if d.next else None) == nxt


def test_window_spanning_midnight_is_open_after_midnight():
    m = DesiredMaintenance(timezone="America/New_York", windows=[
        DesiredWindow(timezone="America/New_York", rrule="FREQ=WEEKLY;BYDAY=FR", start="22:00", duration="6h", origin="t")])
    s = Schedule(m)
    sat_0300 = to_utc(datetime(2026, 12, 5, 3, 0), ZoneInfo("America/New_York")).timestamp()  # Saturday 03:00
    sat_0430 = to_utc(datetime(2026, 12, 5, 4, 30), ZoneInfo("America/New_York")).timestamp()
    assert s.decide(sat_0300).allowed and s.decide(sat_0300).closes == sat_0300 + 3600
    assert not s.decide(sat_0430).allowed


# --------------------------------------------------------------------------- blackouts and scopes

def _store(blackouts, tz="Europe/London"):
    from models.maintenance import DesiredBlackout

    m = DesiredMaintenance(timezone=tz, windows=[DesiredWindow(timezone=tz, rrule="FREQ=DAILY", start="22:00",
                                                               duration="8h", origin="Cluster/x")],
                           blackouts=[DesiredBlackout(timezone=tz, origin="Cluster/x", **b) for b in blackouts])
    return Schedule(m)


def test_blackout_overlapping_a_window_cuts_it():
    s = _store([{"name": "Stocktake", "from": datetime(2026, 12, 2, 1, 0), "to": datetime(2026, 12, 2, 3, 0),
                 "scope": "all", "reason": "annual stocktake"}])
    at = ts("2026-12-01T23:00:00+00:00")
    d = s.decide(at, "component.install", 3600)
    assert d.allowed and d.closes == ts("2026-12-02T01:00:00+00:00")  # the window is cut where the blackout starts
    blocked = s.decide(ts("2026-12-02T01:30:00+00:00"), "component.install", 60)
    assert blocked.rule == "blackout" and blocked.reason.startswith(
        "blackout 'Stocktake' until 2026-12-02 03:00 Europe/London (scope all, from Cluster/x: annual stocktake)")
    assert blocked.next.start == ts("2026-12-02T03:00:00+00:00")  # the rest of the same window
    too_long = s.decide(at, "controlPlane.upgrade", 3 * 3600)
    assert too_long.rule == "estimate" and "closes at 2026-12-02 01:00 Europe/London (in 2h)" in too_long.reason
    assert too_long.next.start == ts("2026-12-02T03:00:00+00:00")  # 3h left in that window: it fits


@pytest.mark.parametrize("scope, blocked_actions", [
    ("all", {"controlPlane.upgrade", "nodePool.upgrade", "nodePool.update", "component.install", "nodePool.scale"}),
    ("minor-upgrades", {"controlPlane.upgrade", "nodePool.upgrade"}),
    ("node-upgrades", {"controlPlane.upgrade", "nodePool.upgrade", "nodePool.update"}),
])
def test_scopes(scope, blocked_actions):
    s = _store([{"name": "Freeze", "from": datetime(2026, 12, 1), "to": datetime(2026, 12, 31), "scope": scope}])
    at = ts("2026-12-10T23:00:00+00:00")
    actions = {"controlPlane.upgrade", "nodePool.upgrade", "nodePool.update", "component.install", "nodePool.scale"}
    assert {a for a in actions if not s.decide(at, a, 60).allowed} == blocked_actions
    assert kind_of("nodePool.update") == "node-upgrade" and kind_of("component.configure") == "change"


def test_calendar_blackout_reason_names_the_rule(example_defs):
    s = schedule_of(resolve(example_defs, "edge-store-01"), example_defs.files)
    d = s.decide(ts("2026-12-20T03:00:00+00:00"), "component.install", 300)
    assert d.reason.startswith("blackout 'Christmas trading' until 2026-12-27 06:00 Europe/London")
    assert d.next.local() == "2026-12-28 02:00–06:00 Europe/London" and d.next.utc() == "2026-12-28 02:00–06:00 UTC"
    # the event recurs yearly (RRULE in the .ics): next year too
    assert s.decide(ts("2027-12-22T03:00:00+00:00")).rule == "blackout"
    # an all-day event is in the cluster's local time
    bf = s.decide(ts("2026-11-28T03:00:00+00:00"))
    assert bf.reason.startswith("blackout 'Black Friday weekend' until 2026-11-30 00:00 Europe/London")


def test_least_availability():
    rules = (WindowRule("FREQ=WEEKLY;BYDAY=SA,SU", "01:00", "8h", "Europe/Berlin"),)
    hours, _ = least_availability(rules, timedelta(days=32))
    assert hours == 64  # 4 whole weekends in any 32 days, 16h each
    assert least_availability((WindowRule("FREQ=DAILY", "02:00", "4h", "UTC"),), timedelta(days=32))[0] == 128


def test_zone_is_cached_and_strict():
    assert zone("Europe/Berlin") is zone("Europe/Berlin")
    with pytest.raises(ValueError):
        zone("Mars/Olympus")


# --------------------------------------------------------------------------- CLI

def test_cli_windows_prints_local_and_utc():
    from typer.testing import CliRunner

    from fleetwright.cli import app

    from .conftest import EXAMPLES

    r = CliRunner().invoke(app, ["windows", str(EXAMPLES), "--cluster", "edge-store-01", "--from", "2026-12-19", "--days", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "edge-store-01  (Europe/London; windows from Cluster/edge-store-01)"
    assert any("window   2026-12-19 02:00–06:00 Europe/London" in x and "2026-12-19 02:00–06:00 UTC" in x for x in lines)
    assert any(x.startswith("  blackout 2026-12-19 06:00–2026-12-27 06:00 Europe/London") and "'Christmas trading'" in x
               for x in lines)
    assert any("2026-12-20 02:00–06:00 Europe/London" in x and "blocked by blackout 'Christmas trading'" in x for x in lines)
    r = CliRunner().invoke(app, ["windows", str(EXAMPLES), "-c", "dc1-web-prod", "--from", "2026-07-04T00:00:00+02:00",
                                 "--days", "1"])
    assert "2026-07-04 01:00–09:00 Europe/Berlin" in r.output and "2026-07-03 23:00–2026-07-04 07:00 UTC" in r.output
    assert CliRunner().invoke(app, ["windows", str(EXAMPLES), "-c", "nope"]).exit_code == 2
    r = CliRunner().invoke(app, ["windows", str(EXAMPLES), "--from", "2026-12-24", "--days", "3"])  # every cluster
    heads = [x.split("  (")[0] for x in r.output.splitlines() if not x.startswith(" ")]
    assert r.exit_code == 0 and heads == sorted(heads) and {"edge-store-01", "dc1-web-prod", "us-web-staging"} <= set(heads)
    assert "us-web-staging  (no window: may change at any time)" in r.output
    assert "2026-12-26 01:00–09:00 Europe/Berlin" in r.output and "2026-12-26 00:00–08:00 UTC" in r.output


def test_render_shows_the_merged_maintenance(example_files, tmp_path):
    """`fleetwright render` prints the merged block: the zone and windows with the level they came from, blackouts
    of every level added up (the fleet's own here, given to every cluster in its own zone)."""
    import json

    from typer.testing import CliRunner

    from fleetwright.cli import app

    files = edit(example_files, "policy.yaml", "    minimumAvailability:", FLEET_DEFAULTS)
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    r = CliRunner().invoke(app, ["render", str(tmp_path), "-c", "edge-store-01", "--format", "json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)["maintenance"]
    assert (m["timezone"], m["timezoneFrom"], m["windowsFrom"]) == ("Europe/London", "Cluster/edge-store-01",
                                                                     "Cluster/edge-store-01")
    assert [(w["name"], w["origin"]) for w in m["windows"]] == [("overnight", "Cluster/edge-store-01")]
    assert [(b["name"], b["timezone"], b["origin"]) for b in m["blackouts"]] == [("Fleet freeze", "Europe/London",
                                                                                 "Policy/fleet")]
    assert m["calendars"][0]["origin"] == "Cluster/edge-store-01 (../calendars/trading.ics)"


# --------------------------------------------------------------------------- the flows' gate (pure parts)

def test_gate_defers_per_step_and_forgets_when_allowed(example_defs):
    from flows.windows import WindowGate
    from models.plan import Step

    store = resolve(example_defs, "edge-store-01")
    up = Step(id="x", cluster="edge-store-01", action="controlPlane.upgrade", target="infrastructure", object="x", reason="")
    comp = Step(id="y", cluster="edge-store-01", action="component.install", target="kubernetes", object="y", reason="")
    gate = WindowGate(example_defs, flow="t", actor="bob", dry_run=True, now=datetime(2026, 12, 1, 5, 30, tzinfo=UTC))
    assert gate.check(store, comp) is None  # 30 minutes left: a 5-minute step fits
    why = gate.check(store, up)  # a 45-minute upgrade does not
    assert why.startswith("controlPlane.upgrade takes about 45m, but the window closes at 2026-12-01 06:00 Europe/London")
    assert "next window 2026-12-02 02:00–06:00 Europe/London (2026-12-02 02:00–06:00 UTC)" in why
    assert gate.record()["deferred"]["edge-store-01"]["rule"] == "estimate"
    assert gate.check(store, comp) is None and gate.record()["deferred"] == {}
    assert gate.check(resolve(example_defs, "us-web-staging"), up) is None  # no window: always open


def test_step_estimates_are_configured_in_the_policy(example_files):
    """The Policy's `estimates` decide whether a step fits before the window closes; a bad one is located."""
    from flows.windows import WindowGate
    from models.plan import Step

    old = "estimates: {controlPlane.upgrade: 45m,"
    defs = load(edit(example_files, "policy.yaml", old, "estimates: {controlPlane.upgrade: 20m,"))
    store = resolve(defs, "edge-store-01")
    up = Step(id="x", cluster="edge-store-01", action="controlPlane.upgrade", target="infrastructure", object="x", reason="")
    gate = WindowGate(defs, flow="t", actor="bob", dry_run=True, now=datetime(2026, 12, 1, 5, 30, tzinfo=UTC))
    assert gate.check(store, up) is None  # 30 minutes left: a 20-minute upgrade fits
    files = edit(example_files, "policy.yaml", old, "estimates: {controlPlane.upgrade: 0m,")
    line = next(i for i, x in enumerate(files["policy.yaml"].splitlines(), 1) if "estimates:" in x)
    (p,) = problems(files)
    assert p.startswith(f"policy.yaml:{line}") and "estimates" in p and "longer than zero" in p, p
    files = edit(example_files, "policy.yaml", old, "estimates: {controlPlane.upgrades: 45m,")
    assert any(x.startswith(f"policy.yaml:{line}") and "controlPlane.upgrades" in x for x in problems(files))


def test_gate_clock_runs_on_from_now_and_needs_a_zone(example_defs):
    from flows.windows import Clock, WindowGate
    from models.errors import PermanentError

    c = Clock(datetime(2026, 12, 24, 10, 0, tzinfo=UTC))
    assert abs(c.now() - ts("2026-12-24T10:00:00+00:00")) < 60 and c.real(c.now()) == pytest.approx(
        datetime.now(UTC).timestamp(), abs=60)
    with pytest.raises(PermanentError, match="has no timezone"):
        Clock(datetime(2026, 12, 24, 10, 0))
    with pytest.raises(Exception, match="platform-only-clock"):  # a real run with a shifted clock
        WindowGate(example_defs, flow="t", actor="bob", dry_run=False, now=datetime(2026, 12, 24, tzinfo=UTC))
    WindowGate(example_defs, flow="t", actor="alice", dry_run=False, now=datetime(2026, 12, 24, tzinfo=UTC))
