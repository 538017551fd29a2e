"""A stand-in for the sync-from-git deployment, served by a real Prefect runner in its own process.

Same name and parameters as ``flows/sync.py``'s flow (see /work/notes/contract-git.md); it only
records what it was asked to sync. Used until the real deployment is on main, and by the benchmark
(which measures the receiver, not the sync). Run: ``python webhook_target.py DEPLOYMENT_NAME``.
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
