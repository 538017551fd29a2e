"""A stand-in for the sync-from-git deployment, served by a real Prefect runner in its own process.

Same name and parameters as ``flows/sync.py``'s flow; it only records what it was asked to sync. It
stays for what measures the receiver alone: ``test_webhook.py`` (what starts a run, replays, bursts,
rotation: deliveries of commits that change no cluster; ``bench/webhook.py`` has a stand-in of its own). The real
``sync-from-git`` deployment, run by a worker and rolling a push out to a cluster, is proven in
``test_webhook_sync.py``. Run: ``python webhook_target.py DEPLOYMENT_NAME``.
"""
from __future__ import annotations

import sys

from prefect import flow


@flow(name="sync-from-git")
def sync_from_git(repo: str, after: str, before: str = "", ref: str = "refs/heads/main", pusher: str = "",
                  event: str = "push", delivery: str = "", subdir: str = "", dry_run: bool = False) -> dict:
    return {"repo": repo, "after": after, "ref": ref, "pusher": pusher, "event": event, "dry_run": dry_run}


if __name__ == "__main__":
    sync_from_git.serve(name=sys.argv[1] if len(sys.argv) > 1 else "sync-from-git", limit=4)
