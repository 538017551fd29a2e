"""One status vocabulary: every flow's Outcome uses models.status.Status; no synonyms."""
import ast
import json
from pathlib import Path

import pytest

from models.status import PROBLEMS, Status
from tasks.cluster import Outcome

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_outcome_takes_the_enum_and_checks_strings():
    o = Outcome("c1", "drift")
    assert o.status is Status.DRIFT and o.status == "drift"
    o.status = "corrected"
    assert o.status is Status.CORRECTED
    with pytest.raises(ValueError, match="unknown status 'unchanged'.*in-sync"):
        Outcome("c1", "unchanged")
    with pytest.raises(ValueError):
        o.status = "ok"


def test_results_stay_plain_json():
    d = Outcome("c1", Status.IN_SYNC).to_dict()
    assert json.loads(json.dumps(d))["status"] == "in-sync" and type(d["status"]) is str
    assert Status.FAILED in PROBLEMS and "refused" in PROBLEMS


def test_no_free_status_strings_in_flows_and_tasks():
    """Outcome(...) in flows/ and tasks/ never spells its status as a literal string."""
    for path in [*(ROOT / "flows").glob("*.py"), *(ROOT / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Outcome" and len(node.args) > 1:
                arg = node.args[1]
                assert not isinstance(arg, ast.Constant), f"{path.name}:{node.lineno}: use Status.X, not {arg.value!r}"
