"""The Git webhook receiver: ``fleetwright webhook serve``.

A push to the definitions repository starts the ``sync-from-git`` deployment. The receiver is an
ASGI app (FastAPI on uvicorn), not a flow: it checks each delivery before any work (body cap,
signature on the raw bytes, event / repository / branch allow-lists), answers within a second and
hands the work to Prefect. The memory that makes a delivery start at most one run lives in Prefect
itself (flow-run idempotency keys), so any number of replicas and restarts share it.

Modules: ``config`` (what is allowed), ``secrets`` (the rotating secrets from a Prefect Secret
block), ``verify`` (signatures), ``providers`` (GitHub / GitLab / Gitea / generic payloads),
``dispatch`` (idempotent flow-run creation and superseding of queued syncs), ``metrics``,
``app`` (the HTTP routes) and ``sender`` (signed deliveries, for plain Git servers, tests and the demo).
"""
