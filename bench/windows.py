"""Benchmark: the next maintenance window of every cluster in fleets of 2,000 and 10,000.

For each cluster: may a control-plane upgrade (45 min) start now, and if not, the rule that blocks it
and its next opening (windows minus the blackouts that cover it, long enough for the step), from an
instant that varies per run. The fleets are generated as merged ``DesiredMaintenance`` objects (what
resolve gives), over 40 IANA zones, with daily, weekend and weekday rules, fixed blackouts on a third
of the clusters and a trading calendar (.ics, with a yearly recurring event) on a tenth:

- ``shared``: windows as platform teams write them, a few distinct rules per zone (a rule's days
  are expanded once per year and shared; each cluster places only the occurrences it looks at);
- ``distinct``: every cluster its own start minute and duration (no two rules alike: the worst case).

Each figure is the best of 3 runs with cold caches, as wall time and as this process's CPU time (on a
shared machine the wall time includes waiting for a core). Writes its section of bench/RESULTS.md and
prints ``windows: clusters=N mode=M seconds=S cpu_seconds=C`` lines.
"""
from __future__ import annotations

import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZONES = ["Europe/London", "Europe/Berlin", "Europe/Paris", "Europe/Madrid", "Europe/Warsaw", "Europe/Helsinki",
         "Europe/Istanbul", "Africa/Johannesburg", "Africa/Lagos", "Asia/Dubai", "Asia/Kolkata", "Asia/Singapore",
         "Asia/Tokyo", "Asia/Seoul", "Asia/Shanghai", "Asia/Jakarta", "Australia/Sydney", "Australia/Perth",
         "Australia/Adelaide", "Pacific/Auckland", "America/New_York", "America/Chicago", "America/Denver",
         "America/Los_Angeles", "America/Phoenix", "America/Toronto", "America/Mexico_City", "America/Sao_Paulo",
         "America/Bogota", "America/Santiago", "America/Halifax", "America/St_Johns", "America/Anchorage",
         "Pacific/Honolulu", "Asia/Kathmandu", "Asia/Tehran", "Australia/Lord_Howe", "Europe/Dublin",
         "Atlantic/Reykjavik", "UTC"]
RULES = [("FREQ=DAILY", "02:00", "4h"), ("FREQ=WEEKLY;BYDAY=SA,SU", "01:00", "8h"),
         ("FREQ=WEEKLY;BYDAY=MO,TU,WE,TH", "22:00", "5h"), ("FREQ=MONTHLY;BYDAY=1SA,3SA", "00:00", "20h")]


def fleet(n: int, distinct: bool, calendar_file: str):
    from models.maintenance import DesiredBlackout, DesiredCalendar, DesiredMaintenance, DesiredWindow

    rnd = random.Random(n + distinct)
    out = []
    for i in range(n):
        tz = ZONES[i % len(ZONES)]
        rule, start, dur = RULES[rnd.randrange(len(RULES))]
        if distinct:
            start = f"{rnd.randrange(24):02d}:{rnd.randrange(60):02d}"
            dur = f"{rnd.randrange(4, 10)}h{rnd.randrange(60)}m"
        blackouts = []
        if i % 3 == 0:
            d0 = datetime(2026, 1, 1) + timedelta(days=rnd.randrange(365))
            blackouts.append(DesiredBlackout(name=f"freeze-{i % 17}", timezone=tz, **{"from": d0},
                                             to=d0 + timedelta(days=rnd.randrange(1, 10)),
                                             scope=rnd.choice(["all", "minor-upgrades", "node-upgrades"]), origin="bench"))
        calendars = [DesiredCalendar(file=calendar_file, timezone=tz, scope="all", digest="x", origin="bench")] \
            if i % 10 == 0 else []
        out.append(DesiredMaintenance(timezone=tz, windows=[DesiredWindow(timezone=tz, rrule=rule, start=start, duration=dur,
                                                                          origin="bench")],
                                      blackouts=blackouts, calendars=calendars))
    return out


def clear_caches() -> None:
    from models import windows

    windows._year_days.cache_clear()
    windows._expansion.cache_clear()
    windows._blackout_ts.cache_clear()
    windows._ZONE_DAYS.clear()
    windows._ics_events.cache_clear()
    windows._PARSED_ICS.clear()


def once(maints, calendars, at: float) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, clusters blocked) for one pass over the fleet, cold caches."""
    from models.windows import Schedule

    clear_caches()
    t0, c0 = time.perf_counter(), time.process_time()
    blocked = 0
    for m in maints:
        d = Schedule(m, calendars).decide(at, "controlPlane.upgrade", 2700.0)
        if not d.allowed:
            blocked += 1
            assert d.next is not None and d.next.start > at and d.reason
    return time.perf_counter() - t0, time.process_time() - c0, blocked


def main() -> None:
    import dateutil.rrule  # noqa: F401 - imports are not what is measured
    import icalendar  # noqa: F401
    import recurring_ical_events  # noqa: F401

    cal_path = ROOT / "examples" / "fleet" / "calendars" / "trading.ics"
    calendars = {"trading.ics": cal_path.read_text()}
    rnd = random.Random()
    at = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp() + rnd.randrange(0, 300 * 86400)
    results, loads = [], []
    for n in (2000, 10000):
        for distinct in (False, True):
            maints = fleet(n, distinct, "trading.ics")
            loads.append(os.getloadavg()[0])
            runs = [once(maints, calendars, at + k * 3600 * 7) for k in range(3)]
            best, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            mode = "distinct" if distinct else "shared"
            results.append((n, mode, best, cpu, runs[0][2]))
            print(f"windows: clusters={n} mode={mode} seconds={best:.3f} cpu_seconds={cpu:.3f} blocked={runs[0][2]}",
                  flush=True)
    loads.append(os.getloadavg()[0])
    from fleetwright.results import write_section

    lines = [f"Measured by `python bench/windows.py` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')} "
             f"(load average {min(loads):.1f} to {max(loads):.1f} while it ran; the wall figure includes waiting for "
             "a core when the machine is shared, the CPU figure is this process's own time): for every "
             "cluster, may a 45-minute control-plane upgrade start now, and if not, the blocking rule and the next "
             "opening long enough for it (windows minus blackouts and calendar events). Best of 3, cold caches, "
             "pure core only (the merged maintenance of each cluster is given; load and resolve are in the core "
             "benchmark).", "",
             "| clusters | rules | wall seconds | CPU seconds | clusters blocked at the instant |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {n:,} | {mode} | {s:.3f} | {c:.3f} | {b:,} |" for n, mode, s, c, b in results]
    write_section("Maintenance windows: next window of every cluster", lines)


if __name__ == "__main__":
    main()
