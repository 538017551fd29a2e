"""The webhook receiver against a real Prefect server, over real HTTP: what starts a run and what does not.

The receiver runs as ``fleetwright webhook serve`` processes (two replicas for the replay proofs);
every assertion about runs counts flow runs in Prefect itself. Deliveries name a repository on the
test environment's real Git server and commits really pushed to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from fleetwright.webhook.sender import gitlab_push_payload, push_payload, signed

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fleet"
BIN = Path(sys.executable).parent
REPO_URL = ""  # the repository on the real Git server (set by the ``fleet_repo`` fixture)
DEPLOYMENT = "sync-from-git/webhook-test"
BLOCK = "webhook-test-secrets"
S1, S2 = "first-secret-d8a2f0", "second-secret-7c41b9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 60, what: str = "condition", every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sha(n: int) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()


def flow_runs() -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT.split("/")[1]])),
                                limit=200)


def run_for(after: str, timeout: float = 60):
    """The one run of commit ``after`` (an answer may come before Prefect has the run: wait for it)."""
    runs = wait_for(lambda: [x for x in flow_runs() if x.parameters.get("after") == after], timeout,
                    f"a run of {after[:12]}")
    assert len(runs) == 1, runs
    return runs[0]


def save_secrets(values: list[str]) -> None:
    from prefect.blocks.system import Secret

    Secret(value=json.dumps(values)).save(BLOCK, overwrite=True)


class Receiver:
    def __init__(self, cfg: Path, log: Path):
        self.cfg, self.log, self.port, self.proc = cfg, log, free_port(), None

    def start(self):
        self.proc = subprocess.Popen([str(BIN / "fleetwright"), "webhook", "serve", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--config", str(self.cfg)],
                                     stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=ROOT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, 240, "the receiver to listen")  # it reads the deployment and secrets first: slow when loaded
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, provider: str, headers: dict, body: bytes) -> httpx.Response:
        return httpx.post(f"{self.url}/hooks/{provider}", headers=headers, content=body, timeout=30)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def target(prefect_api, tmp_path_factory):
    """The deployment a push starts, served by a real runner process (so runs really run, or don't)."""
    log = tmp_path_factory.mktemp("webhook") / "runner.log"
    env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("webhook_target.py")), DEPLOYMENT.split("/")[1]],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    from prefect import get_client

    def registered():
        if proc.poll() is not None:
            raise AssertionError(f"runner exited: {log.read_text()[-2000:]}")
        try:
            with get_client(sync_client=True) as c:
                return c.read_deployment_by_name(DEPLOYMENT)
        except Exception:  # noqa: BLE001
            return None
    wait_for(registered, 90, "the test deployment")
    yield DEPLOYMENT
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class Repo:
    def __init__(self, git_server, name: str):
        self.server, self.name = git_server, name
        self.url = git_server.create(name, EXAMPLES)
        self.n = 0

    def commit(self, branch: str = "main") -> tuple[str, str]:
        """A real commit pushed to ``branch`` over the network: (before, after)."""
        bare = Path(self.server.section["root"]) / f"{self.name}.git"
        if subprocess.run(["git", "-C", str(bare), "rev-parse", "--verify", "-q", f"refs/heads/{branch}"],
                          capture_output=True).returncode:
            subprocess.run(["git", "-C", str(bare), "update-ref", f"refs/heads/{branch}", "refs/heads/main"], check=True)
        before = self.server.head(self.name, branch)
        self.n += 1
        after = self.server.commit(self.name, {"NOTES.md": f"change {self.n}\n"}, f"change {self.n}", author="ann",
                                   branch=branch)
        return before, after

    def head(self, branch: str = "main") -> str:
        return self.server.head(self.name, branch)


@pytest.fixture(scope="module")
def fleet_repo(git_server):
    global REPO_URL
    repo = Repo(git_server, f"webhook-fleet-{os.urandom(3).hex()}")
    REPO_URL = repo.url
    return repo


@pytest.fixture(scope="module")
def receivers(target, fleet_repo, tmp_path_factory):
    """Two replicas of the receiver, one configuration, one Prefect server."""
    d = tmp_path_factory.mktemp("webhook-rx")
    cfg = d / "webhook.yaml"
    cfg.write_text(f"""deployment: {DEPLOYMENT}
secret_block: {BLOCK}
repositories:
  - url: {REPO_URL}
    branches: [main, "release-*"]
    subdir: fleet
debounce_seconds: 8
secret_refresh_seconds: 1
""")
    save_secrets([S1])
    rxs = [Receiver(cfg, d / "rx1.log").start(), Receiver(cfg, d / "rx2.log").start()]
    yield rxs
    for r in rxs:
        r.stop()


def push(secret: str, after: str, before: str = sha(1), ref: str = "refs/heads/main", provider: str = "github",
         delivery: str | None = None, event: str = "push"):
    payload = (gitlab_push_payload if provider == "gitlab" else push_payload)(REPO_URL, ref, before, after, "ann")
    return signed(provider, secret, payload, event=event, delivery=delivery)


def test_valid_push_starts_exactly_one_sync(receivers, fleet_repo):
    rx = receivers[0]
    before = len(flow_runs())
    old, new = fleet_repo.commit()
    h, body = push(S1, new, before=old)
    posted = datetime.now(timezone.utc)
    r = rx.post("github", h, body)
    assert r.status_code == 202 and r.json()["status"] == "accepted", r.text
    run = run_for(new)
    assert len(flow_runs()) == before + 1
    assert run.parameters["after"] == new and run.parameters["before"] == old and run.parameters["repo"] == REPO_URL
    assert run.parameters["pusher"] == "ann" and run.parameters["subdir"] == "fleet"
    assert run.parameters["delivery"] == h["X-GitHub-Delivery"] and run.parameters["dry_run"] is False
    # scheduled after the debounce; on a loaded machine a worker may already have taken it (Pending or later)
    assert run.state.type.value in ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED"), run.state
    assert run.expected_start_time >= posted + timedelta(seconds=7.5), (posted, run.expected_start_time)


@pytest.mark.parametrize("case", ["forged", "gitlab_token", "branch", "event", "tag"])
def test_rejected_deliveries_start_no_run(receivers, fleet_repo, case):
    rx = receivers[1]
    n = len(flow_runs())
    after = fleet_repo.commit("feature-x")[1] if case == "branch" else fleet_repo.head()
    if case == "forged":
        h, body = push("not-the-secret", after)
        want = (401, "bad_signature")
    elif case == "gitlab_token":
        h, body = push("wrong-token", after, provider="gitlab")
        want = (401, "bad_token")
    elif case == "branch":
        h, body = push(S1, after, ref="refs/heads/feature-x")
        want = (202, "branch_not_allowed")
    elif case == "tag":
        h, body = push(S1, after, ref="refs/tags/v1.0")
        want = (202, "not_a_branch")
    else:
        h, body = push(S1, after, event="issues")
        want = (202, "event_not_allowed")
    r = rx.post("gitlab" if case == "gitlab_token" else "github", h, body)
    assert (r.status_code, r.json().get("reason")) == want, r.text
    assert len(flow_runs()) == n
    assert rx.metric("fleetwright_webhook_rejected_total", reason=want[1]) >= 1
    log = rx.log.read_text()
    assert want[1] in log and S1 not in log and "wrong-token" not in log


def _raw_oversize(port: int, headers: dict, total: int, chunked: bool) -> bytes:
    """Send a big body the way a careful client does: stop sending once the server has answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = [f"POST /hooks/github HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    s.setblocking(False)
    chunk, sent, answer = b"x" * 65536, 0, b""
    import select
    try:
        while sent < total:
            r, _, _ = select.select([s], [], [], 0)
            if r:
                break
            try:
                s.sendall((f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
                continue
            sent += len(chunk)
        s.setblocking(True)
        s.settimeout(30)
        while b"\r\n\r\n" not in answer:
            part = s.recv(65536)
            if not part:
                break
            answer += part
    finally:
        s.close()
    return answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_ten_megabyte_body_starts_no_run(receivers, chunked):
    rx = receivers[0]
    n = len(flow_runs())
    h, _ = push(S1, sha(300 + chunked))  # never read: the body is refused first
    h.pop("Content-Type")
    answer = _raw_oversize(rx.port, h, 10 * 1024 * 1024, chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert len(flow_runs()) == n
    assert rx.metric("fleetwright_webhook_rejected_total", reason="body_too_large") >= 1


def test_replayed_delivery_starts_no_run_across_replicas_and_restarts(receivers, fleet_repo):
    rx1, rx2 = receivers
    old, new = fleet_repo.commit("release-1")
    h, body = push(S1, new, before=old, ref="refs/heads/release-1")
    n = len(flow_runs())

    def outcomes() -> tuple[float, float]:  # (runs created, duplicates) over both replicas
        return (sum(r.metric("fleetwright_webhook_runs_created_total") for r in receivers),
                sum(r.metric("fleetwright_webhook_rejected_total", reason="duplicate") for r in receivers))
    created0, dup0 = outcomes()
    # the same delivery, 8 times at once, to both replicas
    results = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.post("github", h, body))) for r in [rx1, rx2] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [202] * 8
    # a reply may come before Prefect has answered (the receiver answers within a second): wait for all 8
    wait_for(lambda: sum(outcomes()) - created0 - dup0 == 8, 240, "every delivery to be handed to Prefect")
    assert sum(r.metric("fleetwright_webhook_rejected_total", reason="dispatch_failed") for r in receivers) == 0
    assert outcomes() == (created0 + 1, dup0 + 7)
    # the answers that name a run (those given after Prefect answered; under load maybe none) name the same one
    assert len({r.json()["flow_run_id"] for r in results} - {None}) <= 1
    assert len(flow_runs()) == n + 1
    # the same commit from a second hook (Gitea, its own delivery id): still that one run
    h2, body2 = push(S1, new, before=old, ref="refs/heads/release-1", provider="gitea")
    dup_rx2 = rx2.metric("fleetwright_webhook_rejected_total", reason="duplicate")
    assert rx2.post("gitea", h2, body2).json()["status"] in ("duplicate", "accepted")  # "accepted": answered late
    wait_for(lambda: rx2.metric("fleetwright_webhook_rejected_total", reason="duplicate") == dup_rx2 + 1, 60,
             "the second hook's delivery to be found a duplicate")
    # a restarted replica remembers (the memory is Prefect's)
    rx1.stop()
    rx1.start()
    r = rx1.post("github", h, body)
    assert r.status_code == 202
    wait_for(lambda: rx1.metric("fleetwright_webhook_rejected_total", reason="duplicate") == 1, 60,
             "the restarted replica to find the earlier run")
    assert rx1.metric("fleetwright_webhook_runs_created_total") == 0
    assert len(flow_runs()) == n + 1


def test_two_pushes_one_second_apart_start_one_sync_at_the_second(receivers, fleet_repo):
    from prefect import get_client

    rx1, rx2 = receivers
    c0, c1 = fleet_repo.commit("release-burst")
    c2 = fleet_repo.commit("release-burst")[1]  # both pushed before the deliveries: a git push takes seconds here
    h1, b1 = push(S1, c1, before=c0, ref="refs/heads/release-burst")
    r1 = rx1.post("github", h1, b1)
    time.sleep(1)  # the scenario: a second push one second later (to the other replica)
    h2, b2 = push(S1, c2, before=c1, ref="refs/heads/release-burst")
    r2 = rx2.post("github", h2, b2)
    assert r1.status_code == r2.status_code == 202 and r1.json()["status"] == r2.json()["status"] == "accepted"
    # under load an answer may come before Prefect has the run: read the runs from Prefect itself
    by_after = wait_for(lambda: (lambda m: m if {c1, c2} <= set(m) else None)(
        {x.parameters["after"]: x for x in flow_runs() if x.parameters.get("ref") == "refs/heads/release-burst"}),
        60, "both runs in Prefect")
    first, second = by_after[c1].id, by_after[c2].id
    with get_client(sync_client=True) as c:
        done = wait_for(lambda: (lambda fr: fr if fr.state.is_final() else None)(c.read_flow_run(second)), 120,
                        "the second sync to finish", every=1)
        assert done.state.type.value == "COMPLETED", done.state
        old = wait_for(lambda: (lambda fr: fr if fr.state.is_final() else None)(c.read_flow_run(first)), 120,
                       "the superseded run to end", every=1)
        assert old.state.type.value == "CANCELLED", old.state
        assert all(s.type.value != "RUNNING" for s in c.read_flow_run_states(first)), "the superseded sync ran"
    burst = [x for x in flow_runs() if x.parameters.get("ref") == "refs/heads/release-burst"]
    assert len(burst) == 2 and sum(x.state.type.value == "COMPLETED" for x in burst) == 1


def test_secret_rotation(receivers, fleet_repo):
    rx = receivers[0]

    def active() -> int:
        return httpx.get(f"{rx.url}/readyz", timeout=10).json().get("secrets", 0)

    save_secrets([S2, S1])  # the change starts: both accepted
    wait_for(lambda: active() == 2, 30, "the receiver to read the rotated block")
    for i, secret in enumerate((S2, S1)):
        old, new = fleet_repo.commit()
        h, body = push(secret, new, before=old)
        assert rx.post("github", h, body).json()["status"] == "accepted"
        run_for(new)
    save_secrets([S2])  # the change ends: the old one is removed
    wait_for(lambda: active() == 1, 30, "the receiver to drop the old secret")
    n = len(flow_runs())
    old, new = fleet_repo.commit()
    h, body = push(S1, new, before=old)
    r = rx.post("github", h, body)
    assert (r.status_code, r.json()["reason"]) == (401, "bad_signature")
    h, body = push(S2, new, before=old)
    assert rx.post("github", h, body).json()["status"] == "accepted"
    run_for(new)
    assert len(flow_runs()) == n + 1
    assert S1 not in rx.log.read_text() and S2 not in rx.log.read_text()
    save_secrets([S1])  # back, for the other tests: that commit signed with S1 is then a duplicate, not a 401
    wait_for(lambda: rx.post("github", *push(S1, new, before=old)).status_code == 202, 30, "the first secret back")
