"""Maintenance windows and blackouts: the schema, and how fleet, model and cluster merge.

A ``maintenance`` block may sit in the Policy (the fleet's defaults and blackouts,
plus the rules every window must meet), on a ClusterModel and on a Cluster::

    maintenance:
      timezone: Europe/London                  # the cluster's local time (IANA name, never an offset)
      windows:
        - {name: weekend, rrule: "FREQ=WEEKLY;BYDAY=SA,SU", start: "01:00", duration: 8h}
      blackouts:
        - {name: Christmas trading, from: "2026-12-24T00:00", to: "2026-12-27T06:00", scope: all,
           reason: peak trading}
      calendars:
        - {file: ../calendars/trading.ics, scope: all}   # relative to this file

Merge, fleet -> model -> cluster:

- ``timezone``: the nearest level that sets it wins.
- windows: the nearest level that sets ``windows`` (or ``alwaysOpen: true``) wins, whole.
  No level sets any: always open.
- ``blackouts`` and ``calendars``: add up over every level.
- A window, blackout or calendar written without a ``timezone`` is in the cluster's
  local time (the merged ``timezone``): one fleet-wide "Saturday 02:00" means 02:00
  in each cluster's own zone.

The result is :class:`DesiredMaintenance` on each ``DesiredCluster`` (shown by
``fleetwright render``); :class:`models.windows.Schedule` answers questions about time.
"""
from __future__ import annotations

import hashlib
import posixpath
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel

from . import windows as w

Scope = Literal["all", "minor-upgrades", "node-upgrades"]
StepAction = Literal[
    "infrastructure.ensure", "controlPlane.create", "controlPlane.upgrade", "controlPlane.scale",
    "nodePool.create", "nodePool.scale", "nodePool.update", "nodePool.upgrade", "nodePool.delete",
    "component.install", "component.upgrade", "component.configure", "component.remove",
    "workspace.create", "workspace.update", "workspace.remove",
]  # the same as models.plan.Action (a unit test keeps them equal)

# How long a step of each kind takes, to decide whether it can finish before its window closes.
DEFAULT_ESTIMATES: dict[str, str] = {
    "infrastructure.ensure": "15m", "controlPlane.create": "30m", "controlPlane.upgrade": "45m",
    "controlPlane.scale": "20m", "nodePool.create": "15m", "nodePool.scale": "10m", "nodePool.update": "30m",
    "nodePool.upgrade": "30m", "nodePool.delete": "15m", "component.install": "5m", "component.upgrade": "5m",
    "component.configure": "5m", "component.remove": "5m", "workspace.create": "2m", "workspace.update": "2m",
    "workspace.remove": "2m",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


def _duration(v: str) -> str:
    w.parse_duration(v)
    return v


def _time_of_day(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):  # YAML 1.1 reads 22:00 as a base-60 number
        raise ValueError(f"must be a string \"HH:MM\": quote it (YAML reads {v // 60}:{v % 60:02d} as the number {v})")
    w.parse_time_of_day(v)
    return v


def _timezone(v: str) -> str:
    w.zone(v)
    return v


def _local(v: Any) -> Any:
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            raise ValueError("give a local time without an offset (set `timezone` for the zone)")
        return v
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    if isinstance(v, str):
        try:
            d = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a local date and time like 2026-12-24T06:00 or 2026-12-24") from None
        if d.tzinfo is not None:
            raise ValueError(f"{v!r}: give a local time without an offset (set `timezone` for the zone)")
        return d
    raise ValueError("must be a local date and time like 2026-12-24T06:00")


Duration = Annotated[str, AfterValidator(_duration)]
TimeOfDay = Annotated[str, BeforeValidator(_time_of_day)]
TimeZone = Annotated[str, AfterValidator(_timezone)]
LocalTime = Annotated[datetime, BeforeValidator(_local)]


class Window(_Strict):
    """A recurring maintenance window: an RRULE (days), a local start time and a duration."""

    name: str = ""
    timezone: TimeZone | None = Field(None, description="IANA zone; default: the cluster's maintenance.timezone")
    since: date | None = Field(None, description="The first day the rule counts from (needed for INTERVAL>1 or COUNT)")
    rrule: str = Field(..., description="RFC 5545 RRULE, e.g. FREQ=WEEKLY;BYDAY=SA,SU")
    start: TimeOfDay = Field(..., description="Local start time, HH:MM")
    duration: Duration = Field(..., description="e.g. 4h, 90m, 1h30m")

    @field_validator("rrule")
    @classmethod
    def _rrule(cls, v: str, info: ValidationInfo) -> str:
        return w.check_rrule(v, anchored=info.data.get("since") is not None)


class Blackout(_Strict):
    """No change of ``scope`` from ``from`` to ``to`` (local times; ``to`` excluded)."""

    name: Annotated[str, Field(min_length=1)]
    timezone: TimeZone | None = None
    from_: LocalTime = Field(..., alias="from")
    to: LocalTime
    scope: Scope = "all"
    reason: str = ""

    @field_validator("to")
    @classmethod
    def _after(cls, v: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("from_")
        if start is not None and v <= start:
            raise ValueError(f"must be after from ({v.isoformat()} <= {start.isoformat()})")
        return v


class CalendarRef(_Strict):
    """Blackouts from an ``.ics`` file in the definitions (each event is a blackout of ``scope``)."""

    file: Annotated[str, Field(pattern=r"\.ics$")]
    timezone: TimeZone | None = Field(None, description="for all-day and floating events; default: the cluster's")
    scope: Scope = "all"


class MaintenanceSpec(_Strict):
    timezone: TimeZone | None = None
    windows: Annotated[list[Window], Field(min_length=1)] | None = None
    always_open: bool = Field(False, description="no window restriction here (overrides an inherited window)")
    blackouts: list[Blackout] = Field(default_factory=list)
    calendars: list[CalendarRef] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_of(self):
        if self.windows and self.always_open:
            raise ValueError("set windows or alwaysOpen: true, not both")
        return self


class Availability(_Strict):
    """At least ``duration`` of window in every ``per`` (GKE: 48h in 32 days)."""

    duration: Duration = "48h"
    per: Duration = "32d"


class FleetMaintenance(MaintenanceSpec):
    """The Policy's block: fleet-wide defaults and blackouts, and the rules every window must meet."""

    minimum_availability: Availability = Field(default_factory=Availability)
    estimates: dict[StepAction, Duration] = Field(default_factory=dict,
                                                  description="how long a step takes (defaults: DEFAULT_ESTIMATES)")


# --------------------------------------------------------------------------- merged

class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class DesiredWindow(_Out):
    name: str = ""
    timezone: str
    rrule: str
    start: str
    duration: str
    since: date | None = None
    origin: str


class DesiredBlackout(_Out):
    name: str
    timezone: str
    from_: datetime = Field(alias="from")
    to: datetime
    scope: str
    reason: str = ""
    origin: str


class DesiredCalendar(_Out):
    file: str
    timezone: str
    scope: str
    digest: str
    origin: str


class DesiredMaintenance(_Out):
    """A cluster's merged maintenance rules: its zone, its windows (none: always open), its blackouts."""

    timezone: str | None = None
    timezone_from: str | None = None
    windows: list[DesiredWindow] = []
    windows_from: str | None = None
    blackouts: list[DesiredBlackout] = []
    calendars: list[DesiredCalendar] = []


class MergeProblem(Exception):
    """A merge that cannot be done: located at a level's document (kind, key) and a field path."""

    def __init__(self, kind: str, key: tuple, loc: tuple, message: str):
        self.kind, self.key, self.loc, self.message = kind, key, loc, message


def levels_of(defs, cluster, model) -> list[tuple]:
    """(kind, key, origin, spec, file) for each level that has a maintenance block, fleet first."""
    out = []
    for pname in sorted(defs.policies):
        m = defs.policies[pname].spec.maintenance
        if m is not None:
            out.append(("Policy", (pname,), f"Policy/{pname}", m, _file(defs, ("Policy", pname))))
    if model is not None and model.spec.maintenance is not None:
        key = (model.metadata.name, model.metadata.version)
        out.append(("ClusterModel", key, f"ClusterModel/{'@'.join(key)}", model.spec.maintenance,
                    _file(defs, ("ClusterModel", *key))))
    if cluster.spec.maintenance is not None:
        n = cluster.metadata.name
        out.append(("Cluster", (n,), f"Cluster/{n}", cluster.spec.maintenance, _file(defs, ("Cluster", n))))
    return out


def _file(defs, key) -> str:
    ref = defs.refs.get(key)
    return ref.file if ref else ""


def calendar_path(doc_file: str, ref: str) -> str:
    """A calendar's path in the definitions: relative to the file that names it."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(doc_file), ref))


def merge(levels: list[tuple], files: dict[str, str], cluster: str) -> DesiredMaintenance | None:
    """Merge the levels (fleet first, cluster last) into one cluster's DesiredMaintenance; None if there are none."""
    if not levels:
        return None
    tz, tz_from = None, None
    chosen = None  # (index, level) of the nearest level that sets windows or alwaysOpen
    for i, lv in enumerate(levels):
        spec = lv[3]
        if spec.timezone:
            tz, tz_from = spec.timezone, lv[2]
        if spec.windows or spec.always_open:
            chosen = (i, lv)

    def zone_for(own: str | None, lv, loc: tuple, what: str) -> str:
        if own or tz:
            return own or tz
        kind, key = lv[0], lv[1]
        if kind != "Cluster":  # a fleet or model rule in local time: the cluster must say which zone it is in
            kind, key, loc = "Cluster", (cluster,), ("spec", "maintenance", "timezone")
        raise MergeProblem(kind, key, loc, f"no timezone for {what} from {lv[2]}: set maintenance.timezone on the "
                                           "cluster, its model or the Policy (an IANA name such as Europe/Berlin)")

    out_windows: list[DesiredWindow] = []
    win_from = None
    if chosen is not None and chosen[1][3].windows:
        lv = chosen[1]
        win_from = lv[2]
        for j, win in enumerate(lv[3].windows):
            out_windows.append(DesiredWindow(
                name=win.name, timezone=zone_for(win.timezone, lv, ("spec", "maintenance", "windows", j, "timezone"),
                                                 f"window {win.name or j}"),
                rrule=w.check_rrule(win.rrule, win.since is not None), start=win.start, duration=win.duration,
                since=win.since, origin=lv[2]))
    elif chosen is not None:  # alwaysOpen: true
        win_from = chosen[1][2]
    blackouts, calendars = [], []
    for lv in levels:
        spec, doc_file = lv[3], lv[4]
        for j, b in enumerate(spec.blackouts):
            blackouts.append(DesiredBlackout(
                name=b.name, timezone=zone_for(b.timezone, lv, ("spec", "maintenance", "blackouts", j, "timezone"),
                                               f"blackout '{b.name}'"),
                **{"from": b.from_}, to=b.to, scope=b.scope, reason=b.reason, origin=lv[2]))
        for j, c in enumerate(spec.calendars):
            path = calendar_path(doc_file, c.file)
            text = files.get(path)
            if text is None:
                raise MergeProblem(lv[0], lv[1], ("spec", "maintenance", "calendars", j, "file"),
                                   f"no calendar {c.file!r} in the definitions (looked for {path})")
            calendars.append(DesiredCalendar(
                file=path, timezone=zone_for(c.timezone, lv, ("spec", "maintenance", "calendars", j, "timezone"),
                                             f"calendar {c.file}"),
                scope=c.scope, digest=hashlib.sha256(text.encode()).hexdigest()[:16], origin=f"{lv[2]} ({c.file})"))
    if not (tz or chosen or blackouts or calendars):
        return None  # only settings (the Policy's rules): nothing restricts this cluster
    return DesiredMaintenance(timezone=tz, timezone_from=tz_from, windows=out_windows, windows_from=win_from,
                              blackouts=blackouts, calendars=calendars)


def fleet_settings(defs) -> FleetMaintenance:
    """The fleet's maintenance rules (minimum availability, step estimates) from the Policy, or the defaults."""
    for pname in sorted(defs.policies):
        m = defs.policies[pname].spec.maintenance
        if m is not None:
            return m
    return FleetMaintenance()


def estimate_seconds(settings: FleetMaintenance, action: str) -> float:
    return w.parse_duration(settings.estimates.get(action) or DEFAULT_ESTIMATES.get(action, "10m")).total_seconds()


def schedule_of(desired, files: dict[str, str]) -> "w.Schedule":
    """The Schedule of a resolved cluster (``files``: the definitions' texts, for its calendars)."""
    m = getattr(desired, "maintenance", None)
    return w.Schedule(m, {c.file: files[c.file] for c in (m.calendars if m else ())})


# --------------------------------------------------------------------------- checks

def check(defs, at) -> None:
    """Per level: calendars exist and parse; declared windows meet the minimum availability. ``at(key, loc, msg)``."""
    settings = fleet_settings(defs)
    need = w.parse_duration(settings.minimum_availability.duration)
    per = w.parse_duration(settings.minimum_availability.per)
    setters = []
    docs = [(("Policy", n), p.spec.maintenance) for n, p in sorted(defs.policies.items())]
    docs += [(("ClusterModel", n, v), m.spec.maintenance) for n, vs in sorted(defs.models.items()) for v, m in sorted(vs.items())]
    docs += [(("Cluster", n), c.spec.maintenance) for n, c in sorted(defs.clusters.items())]
    for key, spec in docs:
        if spec is None:
            continue
        if key[0] == "Policy" and (spec.windows or spec.always_open or spec.timezone):
            setters.append(key)
            if len(setters) > 1:
                at(key, ("spec", "maintenance"), f"fleet maintenance defaults are already set in Policy {setters[0][1]!r}")
        doc_file = _file(defs, key)
        for j, c in enumerate(spec.calendars):
            path = calendar_path(doc_file, c.file)
            text = defs.files.get(path)
            if text is None:
                at(key, ("spec", "maintenance", "calendars", j, "file"), f"no calendar {c.file!r} in the definitions (looked for {path})")
                continue
            try:
                w.parse_ics(text)
                w._ics_spans(text, c.timezone or "UTC", c.scope, "", w.AVAILABILITY_EPOCH, 366)
            except Exception as e:  # noqa: BLE001 - any failure to read the calendar is the user's to fix
                at(key, ("spec", "maintenance", "calendars", j, "file"), f"{path}: {e}")
        if spec.windows:
            tz = spec.timezone or "UTC"
            rules = tuple(w.WindowRule(x.rrule, x.start, x.duration, x.timezone or tz, x.since) for x in spec.windows)
            hours, start = w.least_availability(rules, per)
            if hours * 3600 < need.total_seconds():
                at(key, ("spec", "maintenance", "windows"),
                   f"windows must give at least {settings.minimum_availability.duration} in any "
                   f"{settings.minimum_availability.per} (the minimum availability in the Policy); these give "
                   f"{w.format_duration(timedelta(hours=hours)) if hours else 'nothing'} "
                   f"in the {settings.minimum_availability.per} from {w.fmt(start, tz)[:10]}")
