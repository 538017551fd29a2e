"""The one status vocabulary: what happened to a cluster in a run, shared by every flow.

A ``str`` enum, so artifacts, JSON results and comparisons with plain strings
(``o.status == "drift"``) keep working, while a typo or a synonym fails at once
(``Status("unchanged")`` raises). ``in-sync`` is the one word for "nothing to do".
"""
from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A cluster's outcome in one run."""

    PLANNED = "planned"                      # dry run: the steps that would run
    CONVERGED = "converged"                  # a lifecycle flow applied its steps and verified
    IN_SYNC = "in-sync"                      # observed == desired: nothing to do
    CORRECTED = "corrected"                  # the sweep found drift and repaired it (correct mode)
    DRIFT = "drift"                          # the sweep found drift and reports it (report mode / dry run)
    ABSENT = "absent"                        # the cluster does not exist yet (create-cluster's job)
    DEFERRED = "deferred"                    # not now: outside a change window, or retried later
    DENIED = "denied"                        # the policy gate refused the actor
    REFUSED = "refused"                      # the plan refuses the change (unsupported version, protected...)
    FAILED = "failed"                        # an error, or not converged after apply
    SKIPPED = "skipped"                      # deliberately not handled in this run (e.g. a sweep already running)
    SUPERSEDED = "superseded"                # a newer run took over this change
    AWAITING_APPROVAL = "awaiting-approval"  # waits for a person: its wave, or a sweep's destructive repairs

    @classmethod
    def parse(cls, value: "str | Status") -> "Status":
        """``Status(value)`` with an error that lists the known words."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown status {value!r}; one of: {', '.join(s.value for s in cls)}") from None


#: Outcomes that make a run fail (a person must look).
PROBLEMS: frozenset[Status] = frozenset({Status.FAILED, Status.REFUSED})
#: Outcomes where the cluster matches its definition at the end of the run.
GOOD: frozenset[Status] = frozenset({Status.CONVERGED, Status.IN_SYNC, Status.CORRECTED})
