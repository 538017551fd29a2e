"""One exception tree for all of fleetwright.

Flows and tasks decide what to do with a failure by its class alone: a
``TransientError`` is retried, a ``PermanentError`` stops the step with its
reason. Each backend maps its provider's errors onto this tree in one place.
"""
from __future__ import annotations

from dataclasses import dataclass


class FleetwrightError(Exception):
    """Root of every error fleetwright raises on purpose."""


class TransientError(FleetwrightError):
    """Worth retrying: throttling, 5xx, timeouts, unreachable host, apiserver restarting."""

    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay


class PermanentError(FleetwrightError):
    """Retrying will not help: invalid spec, quota exceeded, auth failure, conflict."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the definitions, located as ``file:line: field: message``."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return f"{loc}: {self.field}: {self.message}" if self.field else f"{loc}: {self.message}"


class SpecInvalid(PermanentError):
    """The definitions are invalid. ``problems`` lists every problem found, each located."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.field, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


class PlanRefused(PermanentError):
    """A plan cannot be made safely (for example an unsupported upgrade)."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


class PolicyDenied(PermanentError):
    """The actor may not make this change. Names the rule, the object and the field."""

    def __init__(self, denials: list):
        self.denials = denials
        super().__init__("; ".join(str(d) for d in denials))


class GateFailed(PermanentError):
    """A health gate or a flow's verify phase found the cluster unhealthy; names the node or object and why."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class OwnershipConflict(PermanentError):
    """A resource with our name exists but is not marked as ours: never adopted, never deleted."""


class InFlight(TransientError):
    """The same operation is already running for this object (CAPV's in-flight rule)."""


class LockTimeout(TransientError):
    """A run waited longer than its bound for a cluster's lock (another run holds it)."""


class LockLost(TransientError):
    """The lease on a cluster's lock was lost while a step ran; the step was stopped."""
