"""The webhook dispatcher: it sends again only the bulk-create items a busy database refused, and checks the deployment's parameter schema once."""
import asyncio

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


def _dispatcher():
    from fleetwright.webhook.dispatch import Dispatcher

    d = Dispatcher("sync-from-git/sync-from-git", 5)
    d._queue = asyncio.Queue()
    return d


def test_a_wave_of_deliveries_still_being_verified_goes_in_one_bulk():
    """Deliveries that the receiver is verifying when a bulk would go out join it (one round trip)."""
    d = _dispatcher()
    d.WAVE_MAX = 60.0  # bounded by the deliveries being verified, not by the clock (a loaded machine is slow)
    verifying = [5]
    d.incoming = lambda: verifying[0]

    async def arrive():
        for i in range(5):
            await asyncio.sleep(0.01)  # 10 ms apart: slower than WAVE_GAP would allow on its own
            d._queue.put_nowait(i + 1)
            d._arrived.set()
            verifying[0] -= 1

    async def go():
        asyncio.ensure_future(arrive())
        return await d._gather([0])
    assert asyncio.run(go()) == [0, 1, 2, 3, 4, 5]


def test_a_lone_push_is_not_held_back():
    d = _dispatcher()

    async def go():
        t = asyncio.get_running_loop().time()
        batch = await d._gather([0])
        return batch, asyncio.get_running_loop().time() - t
    batch, waited = asyncio.run(go())
    assert batch == [0] and waited < d.WAVE_GAP + 1.0  # generous: at most the gap, never WAVE_MAX-long waits


def test_a_wave_is_capped_at_one_bulk():
    d = _dispatcher()
    for i in range(d.BATCH + 5):
        d._queue.put_nowait(i)
    assert asyncio.run(d._gather([-1])) == [-1] + list(range(d.BATCH - 1))
