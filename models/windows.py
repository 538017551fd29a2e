"""Time math for maintenance windows and blackouts, in each cluster's own local time.

Pure: given a cluster's merged :class:`~models.maintenance.DesiredMaintenance`, the
text of the ``.ics`` calendars it names and an instant, answer "may this change
start now, and if not, why and when?".

Daylight saving, chosen and documented (see README):

- A window's start is a wall-clock time in its IANA zone. A start that falls in a
  **gap** (spring forward: 02:30 on the night Europe/Berlin skips 02:00-03:00)
  moves to the **first instant after the gap** (03:00 local). A start that falls
  in a **repeat** (fall back: 01:30 on the night America/New_York passes 01:00-02:00
  twice) takes the **first occurrence** (``fold=0``, still daylight time).
- A window's duration is elapsed time (RFC 5545 exact durations): a 4h window is
  open for 4 real hours even across a change.
- Blackout bounds are wall-clock times in their zone, resolved the same way.

Windows come from an RFC 5545 RRULE (python-dateutil), expanded over naive
wall-clock times, then placed in UTC with ``zoneinfo``; calendars are expanded
with ``recurring-ical-events``. A rule's days are expanded once per rule and year
(shared by every start time, duration and zone that uses it); a question then
places only the occurrences it looks at in UTC, lazily and in order, so a fleet of
thousands of distinct windows costs a few conversions per cluster.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

UTC = timezone.utc
HORIZON_DAYS = 400  # how far ahead a next window is looked for
SHORT_DAYS = 8  # looked at first (most answers are within a week), then 40 days, then HORIZON_DAYS
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")
_TIME = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])$")
_INF = float("inf")
_NOTHING: tuple = ([], [], [])
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

# What a blackout scope blocks (as GKE's exclusion scopes): `all` blocks every change; `minor-upgrades`
# blocks Kubernetes minor upgrades of the control plane and node pools; `node-upgrades` blocks those and
# every change that replaces nodes (GKE's "no minor or node upgrades").
SCOPES = ("all", "minor-upgrades", "node-upgrades")
_MINOR = frozenset({"controlPlane.upgrade", "nodePool.upgrade"})
_NODE = _MINOR | {"nodePool.update"}


def kind_of(action: str) -> str:
    """The kind of change a plan step makes: ``minor-upgrade``, ``node-upgrade`` or ``change``."""
    return "minor-upgrade" if action in _MINOR else "node-upgrade" if action in _NODE else "change"


def blocks(scope: str, kind: str) -> bool:
    """Does a blackout of ``scope`` block a change of ``kind``?"""
    if scope == "all":
        return True
    if scope == "minor-upgrades":
        return kind == "minor-upgrade"
    return kind in ("minor-upgrade", "node-upgrade")


# --------------------------------------------------------------------------- parsing

@functools.lru_cache(maxsize=4096)
def parse_duration(text: str) -> timedelta:
    """``4h``, ``90m``, ``1h30m``, ``2d`` (a day is 24 elapsed hours). Raises ValueError."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration like 4h, 90m, 1h30m or 2d")
    d, h, mi = (int(g or 0) for g in m.groups())
    td = timedelta(days=d, hours=h, minutes=mi)
    if td <= timedelta(0):
        raise ValueError(f"{text!r}: must be longer than zero")
    return td


def format_duration(td: timedelta) -> str:
    mins = int(td.total_seconds() // 60)
    d, rest = divmod(mins, 1440)
    h, m = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m")) if v) or "0m"


@functools.lru_cache(maxsize=4096)
def parse_time_of_day(text: str) -> tuple[int, int]:
    m = _TIME.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a time of day like 02:00 or 22:30")
    return int(m.group(1)), int(m.group(2))


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; a clear ValueError for offsets, typos and unknown names."""
    if not isinstance(name, str) or not name:
        raise ValueError("a timezone is an IANA name such as Europe/Berlin")
    if re.match(r"^(UTC|GMT)?\s*[+-]\d", name):
        raise ValueError(f"unknown timezone {name!r}: use an IANA name such as Europe/Berlin, not an offset "
                         "(an offset drifts at every daylight-saving change)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    lower = {z.lower(): z for z in available_timezones()}
    hint = f"; did you mean {lower[name.lower()]}?" if name.lower() in lower else " (an IANA name such as Europe/Berlin)"
    raise ValueError(f"unknown timezone {name!r}{hint}")


def to_utc(local: datetime, tz: ZoneInfo) -> datetime:
    """A naive wall-clock time in ``tz`` as an aware UTC instant (gap: first instant after it; repeat: fold=0)."""
    return datetime.fromtimestamp(utc_ts(local, tz), UTC)


def utc_ts(local: datetime, tz: ZoneInfo) -> float:
    """:func:`to_utc` as a timestamp. PEP 495: ``fold=0`` reads a wall time with the offset before a
    change, ``fold=1`` with the offset after it; they differ only in a gap or a repeat."""
    before = tz.utcoffset(local)
    after = tz.utcoffset(local.replace(fold=1))
    wall = local.replace(tzinfo=UTC).timestamp()
    if before >= after:  # an ordinary time, or a repeat (the first occurrence: the offset before the change)
        return wall - before.total_seconds()
    # a gap: the change happened between wall-after and wall-before; find the instant to the second
    lo, hi = int(wall - after.total_seconds()), int(wall - before.total_seconds())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(tz).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return float(hi)


def rrule_parts(text: str) -> dict[str, str]:
    body = text.strip()
    if body.upper().startswith("RRULE:"):
        body = body[6:]
    parts = {}
    for item in filter(None, body.split(";")):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"not a valid RFC 5545 RRULE: {item!r} is not NAME=VALUE")
        parts[k.strip().upper()] = v.strip()
    return parts


def check_rrule(text: str, anchored: bool) -> str:
    """Validate a window's RRULE; returns it without an ``RRULE:`` prefix. Raises ValueError with the reason."""
    from dateutil.rrule import rrulestr

    parts = rrule_parts(text)
    body = ";".join(f"{k}={v}" for k, v in parts.items())
    if "FREQ" not in parts:
        raise ValueError("not a valid RFC 5545 RRULE: FREQ is required (for example FREQ=WEEKLY;BYDAY=SA,SU)")
    try:
        rrulestr(body, dtstart=datetime(2026, 1, 5))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a valid RFC 5545 RRULE: {e}") from None
    freq = parts["FREQ"].upper()
    if freq not in ("DAILY", "WEEKLY", "MONTHLY", "YEARLY"):
        raise ValueError(f"FREQ={freq}: a window recurs DAILY, WEEKLY, MONTHLY or YEARLY (its time of day is `start`)")
    for k in ("BYHOUR", "BYMINUTE", "BYSECOND", "DTSTART"):
        if k in parts:
            raise ValueError(f"{k} is not allowed: the window's time of day is `start`")
    if not anchored:
        if "COUNT" in parts or int(parts.get("INTERVAL", "1") or 1) > 1:
            raise ValueError("COUNT and INTERVAL>1 count from a first day: set `since` (a date) on the window")
        pinned = {"WEEKLY": ("BYDAY",), "MONTHLY": ("BYDAY", "BYMONTHDAY"),
                  "YEARLY": ("BYYEARDAY", "BYWEEKNO")}.get(freq, ())
        if freq == "YEARLY" and "BYMONTH" in parts and ("BYMONTHDAY" in parts or "BYDAY" in parts):
            pinned = ()
        if pinned and not any(p in parts for p in pinned):
            raise ValueError(f"FREQ={freq} without {' or '.join(pinned)} depends on the day it counts from: "
                             f"add {pinned[0]}=... or set `since` on the window")
    return body


# --------------------------------------------------------------------------- expansion

@dataclass(frozen=True, slots=True)
class WindowRule:
    """One recurring window, fully resolved (its zone is known). Hashable: the expansion cache key."""

    rrule: str
    start: str
    duration: str
    timezone: str
    since: date | None = None
    name: str = ""
    origin: str = ""

    def describe(self) -> str:
        label = f"'{self.name}' " if self.name else ""
        return f"{label}{self.rrule} at {self.start} for {self.duration} {self.timezone} ({self.origin})"


@functools.lru_cache(maxsize=65536)
def _year_days(rrule: str, since: date | None, at: time | None, year: int) -> tuple[int, ...]:
    """The days (ordinals) of ``year`` on which ``rrule`` has an occurrence: one dateutil expansion per rule
    and year, shared by every start time, duration and zone. Counted from ``since`` (or 1 January: a rule
    without ``since`` does not depend on its first day, see :func:`check_rrule`). ``at`` is the start time,
    only for a rule with UNTIL (which compares dates and times); None otherwise."""
    from dateutil.rrule import rrulestr

    if since is not None and since.year > year:
        return ()
    first = datetime.combine(since or date(year, 1, 1), at or time(0, 0))
    lo, hi = datetime(year, 1, 1), datetime(year, 12, 31, 23, 59, 59)
    return tuple(d.toordinal() for d in rrulestr(rrule, dtstart=first).between(lo, hi, inc=True))


class _Expansion:
    """One window rule placed in its zone: its occurrences as UTC (start, end) timestamps, made lazily in order.

    Most questions need one to three occurrences, so none is computed before it is asked for: the days come
    from :func:`_year_days` (cached per rule and year), and each start is one wall-clock-to-UTC conversion."""

    __slots__ = ("rrule", "since", "until_at", "tzname", "tod", "tod_s", "secs", "reach", "may_overlap", "days_of_zone")

    def __init__(self, rrule: str, start: str, duration: str, tzname: str, since: date | None):
        h, m = parse_time_of_day(start)
        dur = parse_duration(duration)
        self.rrule, self.since, self.tzname = rrule, since, tzname
        self.days_of_zone = _zone_days(tzname)
        self.until_at = time(h, m) if "UNTIL=" in rrule.upper() else None
        self.tod = timedelta(hours=h, minutes=m)
        self.tod_s = h * 3600 + m * 60
        self.secs = dur.total_seconds()
        self.reach = dur.days + 2  # an occurrence that started this many UTC days before a day may still be open on it
        self.may_overlap = self.secs > 22 * 3600  # two starts of one rule are at least a day less an hour apart

    def start_ts(self, ordinal: int) -> float:
        """The UTC timestamp of the occurrence on local day ``ordinal`` (see :func:`utc_ts` for gaps and repeats)."""
        off = self.days_of_zone.get(ordinal, _MISSING)
        if off is _MISSING:
            off = _fill_zone_year(self.tzname, self.days_of_zone, ordinal)
        if off is None:  # the zone's offset changes that day: the careful way
            return utc_ts(datetime.fromordinal(ordinal) + self.tod, zone(self.tzname))
        return (ordinal - _EPOCH_ORDINAL) * 86400.0 + self.tod_s - off

    def days(self, first: int, last: int):
        """The ordinals of the occurrence days from ``first`` to ``last``, in order."""
        year, end = date.fromordinal(first).year, date.fromordinal(last).year
        while year <= end:
            days = _year_days(self.rrule, self.since, self.until_at, year)
            for o in days[bisect.bisect_left(days, first):]:
                if o > last:
                    return
                yield o
            year += 1

    def spans(self, frm: float, stop: float):
        """The occurrences that end after ``frm`` and start before ``stop``, in order of start."""
        # local days are UTC days +-1 (offsets are within 14 hours): plain arithmetic, no zone conversion
        first = int(frm // 86400) + _EPOCH_ORDINAL - self.reach
        last = int(stop // 86400) + _EPOCH_ORDINAL + 1
        secs = self.secs
        for o in self.days(first, last):
            s = self.start_ts(o)
            if s >= stop:
                return
            if s + secs > frm:
                yield s, s + secs


_MISSING = object()
_ZONE_DAYS: dict[str, dict[int, float | None]] = {}


def _zone_days(tzname: str) -> dict[int, float | None]:
    """Per zone: local day (ordinal) -> its UTC offset in seconds when steady all day, None on a change day."""
    d = _ZONE_DAYS.get(tzname)
    if d is None:
        if len(_ZONE_DAYS) > 1024:
            _ZONE_DAYS.clear()
        d = _ZONE_DAYS[tzname] = {}
    return d


def _fill_zone_year(tzname: str, days: dict[int, float | None], ordinal: int) -> float | None:
    """Fill ``days`` for the year of ``ordinal`` (one look at the zone per day, once a year); the offset of ``ordinal``."""
    tz = zone(tzname)
    year = date.fromordinal(ordinal).year
    o, end = date(year, 1, 1).toordinal(), date(year, 12, 31).toordinal()
    nxt = tz.utcoffset(datetime.fromordinal(o))
    while o <= end:
        start = datetime.fromordinal(o)
        here, here1 = nxt, tz.utcoffset(start.replace(fold=1))
        nxt = tz.utcoffset(datetime.fromordinal(o + 1))
        days[o] = here.total_seconds() if here == here1 == nxt else None
        o += 1
    return days[ordinal]


@functools.lru_cache(maxsize=65536)
def _expansion(rrule: str, start: str, duration: str, tzname: str, since: date | None) -> _Expansion:
    return _Expansion(rrule, start, duration, tzname, since)


def _occurrences(rrule: str, start: str, duration: str, tzname: str, since: date | None, day0: date,
                 days: int) -> tuple[tuple[float, float], ...]:
    """(start, end) UTC timestamps of the occurrences on the local days ``day0 - (duration + 2 days)`` to ``day0 + days``."""
    x = _expansion(rrule, start, duration, tzname, since)
    first = day0.toordinal() - x.reach
    return tuple((s, s + x.secs) for s in map(x.start_ts, x.days(first, day0.toordinal() + days)))


def _coalesce(spans):
    """Overlapping or touching spans (in order of start) as one."""
    cur_s = cur_e = None
    for s, e in spans:
        if cur_s is None:
            cur_s, cur_e = s, e
        elif s <= cur_e:
            if e > cur_e:
                cur_e = e
        else:
            yield cur_s, cur_e
            cur_s, cur_e = s, e
    if cur_s is not None:
        yield cur_s, cur_e


def _merge(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


@dataclass(frozen=True, slots=True)
class BlackoutSpan:
    """One blackout occurrence in UTC, with what a person needs to see: name, reason, scope, zone, origin."""

    start: float
    end: float
    name: str
    reason: str
    scope: str
    timezone: str
    origin: str


_PARSED_ICS: dict[str, object] = {}


def parse_ics(text: str):
    """An ``icalendar.Calendar`` (cached by content). Raises ValueError naming the first problem."""
    import icalendar

    key = hashlib.sha256(text.encode()).hexdigest()
    cal = _PARSED_ICS.get(key)
    if cal is None:
        try:
            cal = icalendar.Calendar.from_ical(text)
        except Exception as e:  # noqa: BLE001 - icalendar raises ValueError and friends on bad text
            raise ValueError(f"not a valid iCalendar file: {e}") from None
        for comp in cal.walk("VEVENT"):
            if getattr(comp, "errors", None):
                prop, msg = comp.errors[0]
                raise ValueError(f"event {str(comp.get('SUMMARY', '?'))!r}: {prop}: {msg}")
            if comp.get("DTSTART") is None:
                raise ValueError(f"event {str(comp.get('SUMMARY', '?'))!r}: DTSTART is missing")
        if len(_PARSED_ICS) > 256:
            _PARSED_ICS.clear()
        _PARSED_ICS[key] = cal
    return cal


def _ics_spans(text: str, tzname: str, scope: str, origin: str, day0: date, days: int) -> list[BlackoutSpan]:
    return [BlackoutSpan(s, e, name, reason, scope, tzname, origin) for s, e, name, reason in _ics_events(text, tzname, day0, days)]


@functools.lru_cache(maxsize=4096)
def _ics_events(text: str, tzname: str, day0: date, days: int) -> tuple[tuple[float, float, str, str], ...]:
    import recurring_ical_events

    cal = parse_ics(text)
    tz = zone(tzname)
    lo = datetime.combine(day0 - timedelta(days=2), time(0, 0))
    hi = datetime.combine(day0 + timedelta(days=days + 1), time(0, 0))
    out = []
    for ev in recurring_ical_events.of(cal).between(lo, hi):
        start = ev["DTSTART"].dt
        end = ev["DTEND"].dt if ev.get("DTEND") is not None else None
        if end is None and ev.get("DURATION") is not None:
            end = start + ev["DURATION"].dt
        if end is None:
            end = start + timedelta(days=1) if not isinstance(start, datetime) else start
        s, e = _instant(start, tz), _instant(end, tz)
        if e <= s:
            continue
        name = str(ev.get("SUMMARY", "") or "calendar event")
        reason = str(ev.get("DESCRIPTION", "") or name)
        out.append((s, e, name, reason))
    return tuple(sorted(out))


def _instant(v, tz: ZoneInfo) -> float:
    """A calendar value as a UTC timestamp: dates and floating times are the cluster's local time."""
    if not isinstance(v, datetime):
        v = datetime.combine(v, time(0, 0))
    if v.tzinfo is None:
        return utc_ts(v, tz)
    return v.timestamp()


# --------------------------------------------------------------------------- answers

def fmt(ts: float, tzname: str) -> str:
    """``2026-12-27 06:00 Europe/London``"""
    if ts in (_INF, -_INF):
        return "never" if ts > 0 else "always"
    return datetime.fromtimestamp(ts, UTC).astimezone(zone(tzname)).strftime("%Y-%m-%d %H:%M") + f" {tzname}"


def span(start: float, end: float, tzname: str) -> str:
    """``2026-12-05 01:00–09:00 Europe/Berlin`` (dates repeated only when they differ)."""
    if end == _INF:
        return f"from {fmt(start, tzname)}"
    a, b = fmt(start, tzname)[:16], fmt(end, tzname)[:16]
    return f"{a}–{b[11:] if a[:10] == b[:10] else b} {tzname}"


def upcoming(schedule: "Schedule", since: float, until: float) -> list[dict]:
    """Window occurrences and blackouts in [since, until), in order, each in local time and UTC (for people)."""
    rows = []
    spans = schedule.blackouts_between(since, until)
    for o in schedule.occurrences(since, until):
        over = [b for b in spans if b.start < o.end and b.end > o.start]
        note = "; ".join(f"{'blocked' if b.start <= o.start and b.end >= o.end else 'cut'}"
                         f"{'' if b.scope == 'all' else ' for ' + b.scope} by blackout '{b.name}'" for b in over)
        rows.append({"kind": "window", "start": o.start, "local": o.local(), "utc": o.utc(), "note": note})
    for b in spans:
        rows.append({"kind": "blackout", "start": b.start, "local": span(b.start, b.end, b.timezone),
                     "utc": span(b.start, b.end, "UTC"), "note": f"'{b.name}' scope {b.scope}, from {b.origin}"
                     + (f": {b.reason}" if b.reason and b.reason != b.name else "")})
    rows.sort(key=lambda r: (r["start"], r["kind"] != "blackout"))
    return rows


@dataclass(frozen=True)
class Opening:
    """A stretch of time in which a change of some kind may run: its bounds (UTC timestamps) and the cluster's zone."""

    start: float
    end: float
    timezone: str

    @property
    def start_utc(self) -> datetime:
        return datetime.fromtimestamp(self.start, UTC)

    def local(self) -> str:
        return span(self.start, self.end, self.timezone)

    def utc(self) -> str:
        return Opening(self.start, self.end, "UTC").local()

    def __str__(self) -> str:
        return f"{self.local()} ({self.utc()})"


@dataclass(frozen=True)
class Decision:
    """May a change start at ``at``? If not: the rule that blocks it (``blocker``) and the next opening."""

    allowed: bool
    reason: str = ""  # the blocking rule, for a person: "blackout 'Christmas trading' until 2026-12-27 06:00 Europe/London"
    rule: str = ""    # window | blackout | estimate
    next: Opening | None = None
    closes: float = _INF  # when the current opening ends (allowed decisions)

    def __str__(self) -> str:
        if self.allowed:
            return "allowed"
        nxt = f"; next window {self.next}" if self.next else f"; no window in the next {HORIZON_DAYS} days"
        return self.reason + nxt


class Schedule:
    """A cluster's windows and blackouts, ready to answer questions about instants.

    ``maintenance`` is a :class:`models.maintenance.DesiredMaintenance` (or None: always open);
    ``calendars`` maps a calendar's file to its text. Window occurrences are made lazily, in order,
    from the instant asked about (at most HORIZON_DAYS ahead); calendar events are expanded for
    SHORT_DAYS first, then 40 days, then HORIZON_DAYS, only as far as a question needs.
    """

    def __init__(self, maintenance, calendars: dict[str, str] | None = None):
        self.m = maintenance
        self.calendars = calendars or {}
        self.timezone = (maintenance.timezone if maintenance is not None else None) or "UTC"
        wins = maintenance.windows if maintenance is not None else ()
        self._x = [_expansion(w.rrule, w.start, w.duration, w.timezone, w.since) for w in wins]
        self.always_open = not self._x
        self._reach = max((x.reach for x in self._x), default=0) + 1
        self._cache: dict = {}

    @property
    def rules(self) -> tuple[WindowRule, ...]:
        return tuple(WindowRule(w.rrule, w.start, w.duration, w.timezone, w.since, w.name, w.origin)
                     for w in (self.m.windows if self.m is not None else ()))

    @property
    def unrestricted(self) -> bool:
        m = self.m
        return m is None or (self.always_open and not m.blackouts and not m.calendars)

    # -- raw material
    def window_spans(self, frm: float, stop: float):
        """The window occurrences (every rule, overlaps joined) that end after ``frm`` and start before ``stop``."""
        if self.always_open:
            yield -_INF, _INF
            return
        xs = self._x
        if len(xs) == 1 and not xs[0].may_overlap:
            yield from xs[0].spans(frm, stop)
        else:
            yield from _coalesce(heapq.merge(*(x.spans(frm, stop) for x in xs)))

    def blackouts(self, day0: date, days: int = HORIZON_DAYS) -> list[BlackoutSpan]:
        """Every blackout that may overlap [day0 - a few days, day0 + days]: the fixed ones, and calendar events."""
        key = ("b", day0, days)
        if key not in self._cache:
            spans = list(self._fixed())
            for c in self.m.calendars if self.m is not None else ():
                spans.extend(_ics_spans(self.calendars[c.file], c.timezone, c.scope, c.origin, day0, days + self._reach))
            self._cache[key] = sorted(spans, key=lambda s: (s.start, s.end))
        return self._cache[key]

    def _fixed(self) -> list[BlackoutSpan]:
        hit = self._cache.get("fixed")
        if hit is None:
            hit = self._cache["fixed"] = [
                BlackoutSpan(_blackout_ts(b.from_, b.timezone), _blackout_ts(b.to, b.timezone), b.name, b.reason, b.scope,
                             b.timezone, b.origin) for b in (self.m.blackouts if self.m is not None else ())]
        return hit

    def _blocking(self, day0: date, kind: str, days: int = HORIZON_DAYS):
        """(merged spans, their ends, the spans) of the blackouts that block ``kind``, for [day0, day0 + days]."""
        if not self.m.blackouts and not self.m.calendars:
            return _NOTHING
        if not self.m.calendars:
            days = HORIZON_DAYS  # fixed blackouts do not depend on the range: one answer for all
        key = ("k", day0, kind, days)
        hit = self._cache.get(key)
        if hit is None:
            spans = [s for s in self.blackouts(day0, days) if blocks(s.scope, kind)]
            merged = _merge((s.start, s.end) for s in spans)
            hit = self._cache[key] = (merged, [e for _, e in merged], spans)
        return hit

    # -- questions
    def free(self, at: float, kind: str = "change", until: float | None = None, day0: date | None = None):
        """Open stretches (windows minus the blackouts that block ``kind``) from ``at`` to ``until``, in order."""
        day0 = day0 or datetime.fromtimestamp(at, UTC).date()
        until = at + HORIZON_DAYS * 86400 if until is None else until
        base = (day0.toordinal() - _EPOCH_ORDINAL) * 86400.0
        stages = iter((SHORT_DAYS, 40, HORIZON_DAYS) if self.m is not None and self.m.calendars else (HORIZON_DAYS,))
        days = next(stages)
        bl, ends, _ = self._blocking(day0, kind, days) if self.m is not None else _NOTHING
        known = base + days * 86400  # blackouts are known up to here
        nbl = len(bl)
        for s, e in self.window_spans(at, until):
            if s < at:
                s = at
            if s >= until:
                return
            while e > known and days < HORIZON_DAYS:  # the stretch reaches past the calendar events expanded so far
                days = next(stages)
                bl, ends, _ = self._blocking(day0, kind, days)
                known, nbl = base + days * 86400, len(bl)
            if not nbl:
                yield s, e
                continue
            j = bisect.bisect_right(ends, s)
            while s < e:
                if j < nbl and bl[j][0] <= s:  # inside a blackout: skip past it
                    s = max(s, bl[j][1])
                    j += 1
                    continue
                stop = min(e, bl[j][0]) if j < nbl else e
                if stop > s:
                    yield s, stop
                s = stop

    def _scan(self, at: float, kind: str, need: float, day0: date):
        """(the first open stretch from ``at``, the first one with ``need`` seconds in it as an Opening)."""
        first = None
        for s, e in self.free(at, kind, day0=day0):
            if first is None:
                first = (s, e)
            if e - s >= need and e > s:
                return first, Opening(s, e, self.timezone)
        return first, None

    def next_opening(self, at: float, kind: str = "change", need: float = 0.0) -> Opening | None:
        """The first stretch from ``at`` with at least ``need`` seconds left in it."""
        return self._scan(at, kind, need, datetime.fromtimestamp(at, UTC).date())[1]

    def decide(self, at: float, action: str = "component.install", need: float = 0.0) -> Decision:
        """May a step ``action`` that takes about ``need`` seconds start at ``at``?"""
        if self.unrestricted:
            return Decision(True)
        kind = kind_of(action)
        day0 = datetime.fromtimestamp(at, UTC).date()
        first, nxt = self._scan(at, kind, need, day0)
        if nxt is not None and nxt.start <= at:
            return Decision(True, closes=nxt.end)
        merged, _, spans = self._blocking(day0, kind, SHORT_DAYS)
        hits = [s for s in spans if s.start <= at < s.end]
        if hits:
            b = max(hits, key=lambda s: s.end)
            until = next((e for s, e in merged if s <= at < e), b.end)
            reason = f"blackout '{b.name}' until {fmt(until, b.timezone)}"
            extra = f" (scope {b.scope}, from {b.origin}" + (f": {b.reason}" if b.reason != b.name else "") + ")"
            return Decision(False, reason + extra, "blackout", nxt)
        if first is not None and first[0] <= at:
            return Decision(False, f"{action} takes about {format_duration(timedelta(seconds=need))}, but the window "
                                   f"closes at {fmt(first[1], self.timezone)} (in {format_duration(timedelta(seconds=first[1] - at))})",
                            "estimate", nxt)
        rules = "; ".join(r.describe() for r in self.rules)
        return Decision(False, f"outside its maintenance window ({rules})", "window", nxt)

    def occurrences(self, since: float, until: float) -> list[Opening]:
        """The raw window occurrences overlapping [since, until) (blackouts not taken off)."""
        if self.always_open:
            return []
        return [Opening(s, e, self.timezone) for s, e in self.window_spans(since, until)]

    def blackouts_between(self, since: float, until: float) -> list[BlackoutSpan]:
        day0 = datetime.fromtimestamp(since, UTC).date()
        days = int((until - since) // 86400) + 2
        return [b for b in self.blackouts(day0, days) if b.end > since and b.start < until]


@functools.lru_cache(maxsize=65536)
def _blackout_ts(local: datetime, tzname: str) -> float:
    return utc_ts(local, zone(tzname))


# --------------------------------------------------------------------------- availability

AVAILABILITY_EPOCH = date(2026, 1, 5)  # rules without `since` are judged over the year from this Monday


def least_availability(rules: tuple[WindowRule, ...], per: timedelta) -> tuple[float, float]:
    """(hours, start timestamp) of the rolling period of length ``per`` with the least window time in it.

    Judged over one year from the earliest ``since`` (or AVAILABILITY_EPOCH); windows only, not blackouts.
    Cached by the rules' timing (clusters that copy one window are judged once).
    """
    return _least_availability(tuple((r.rrule, r.start, r.duration, r.timezone, r.since) for r in rules), per)


@functools.lru_cache(maxsize=4096)
def _least_availability(rules: tuple[tuple, ...], per: timedelta) -> tuple[float, float]:
    first = min((r[4] for r in rules if r[4]), default=AVAILABILITY_EPOCH)
    span = 366
    per_s = per.total_seconds()
    occ = _merge(o for r in rules for o in _occurrences(*r, first, span + per.days + 2))
    t0 = datetime.combine(first, time(0, 0), UTC).timestamp()
    t_end = t0 + span * 86400
    starts = [s for s, _ in occ]
    cum = [0.0]
    for s, e in occ:
        cum.append(cum[-1] + (e - s))

    def covered_until(x: float) -> float:  # window seconds in [-inf, x)
        i = bisect.bisect_right(starts, x)
        total = cum[i]
        if i and occ[i - 1][1] > x:
            total -= occ[i - 1][1] - x
        return total

    best, where = _INF, t0
    for x in [t0] + [e for _, e in occ if t0 <= e <= t_end]:
        c = covered_until(x + per_s) - covered_until(x)
        if c < best:
            best, where = c, x
    return best / 3600, where
