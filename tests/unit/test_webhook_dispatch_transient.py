"""The webhook dispatcher: it sends again only the bulk-create items a busy database refused, and checks the deployment's parameter schema once."""
from fleetwright.webhook.dispatch import _transient


def test_busy_database_errors_are_transient():
    assert _transient({"status": "FAILED", "error": "(sqlite3.OperationalError) database is locked"})
    assert _transient({"status": "FAILED", "error": "could not serialize access due to concurrent update"})


def test_request_errors_are_not_transient():
    assert not _transient({"status": "FAILED", "error": "parameters do not match the deployment's schema"})
    assert not _transient({"status": "CREATED"})


def test_the_deployment_schema_is_checked_once_instead_of_per_run():
    from fleetwright.webhook.dispatch import schema_problem

    props = {k: {} for k in ("repo", "after", "before", "ref", "pusher", "event", "delivery", "subdir", "dry_run")}
    assert schema_problem({"properties": props, "required": ["repo", "after"]}) is None
    assert schema_problem(None) is None and schema_problem({}) is None
    assert "no parameter dry_run" in schema_problem({"properties": {k: {} for k in props if k != "dry_run"}})
    assert "requires cluster" in schema_problem({"properties": {**props, "cluster": {}}, "required": ["cluster"]})
