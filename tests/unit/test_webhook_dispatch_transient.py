"""The webhook dispatcher sends again only the bulk-create items a busy database refused."""
from fleetwright.webhook.dispatch import _transient


def test_busy_database_errors_are_transient():
    assert _transient({"status": "FAILED", "error": "(sqlite3.OperationalError) database is locked"})
    assert _transient({"status": "FAILED", "error": "could not serialize access due to concurrent update"})


def test_request_errors_are_not_transient():
    assert not _transient({"status": "FAILED", "error": "parameters do not match the deployment's schema"})
    assert not _transient({"status": "CREATED"})
