"""Property tests: mangled definitions give only typed, located errors; resolve is deterministic; converged means empty."""
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fleetwright.cli import app
from models.desired import observed_from
from models.errors import SpecInvalid
from models.load import load
from models.plan import plan
from models.resolve import resolve_all

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mangle(text: str, pos: int, op: int, junk: str) -> str:
    pos = pos % (len(text) + 1)
    if op == 0:
        return text[:pos] + junk + text[pos:]
    if op == 1:
        return text[:pos] + text[pos + len(junk) + 1:]
    if op == 2:
        lines = text.splitlines(keepends=True)
        i = pos % max(len(lines), 1)
        return "".join(lines[:i] + lines[i + 1:])
    return text[:pos] + junk.upper() + text[pos + len(junk):]


@FAST
@given(data=st.data())
def test_mangled_definitions_raise_only_located_spec_errors(example_files, data):
    name = data.draw(st.sampled_from(sorted(example_files)))
    files = dict(example_files)
    for _ in range(data.draw(st.integers(1, 3))):
        files[name] = _mangle(files[name], data.draw(st.integers(0, 10**6)), data.draw(st.integers(0, 3)),
                              data.draw(st.text(string.printable, max_size=12)))
    try:
        load(files)
    except SpecInvalid as e:
        assert e.problems
        for p in e.problems:
            assert p.file in files and p.line >= 0 and p.message


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=8), st.floats(allow_nan=False))
yaml_values = st.recursive(yaml_scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=8)


@FAST
@given(kind=st.sampled_from(["Cluster", "ClusterModel", "Component", "Team", "Policy", "Other"]), spec=yaml_values,
       meta=yaml_values)
def test_random_documents_raise_only_spec_errors(example_files, kind, spec, meta):
    import yaml

    files = dict(example_files)
    files["random.yaml"] = yaml.safe_dump({"apiVersion": "fleetwright.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec})
    try:
        load(files)
    except SpecInvalid as e:
        assert all(p.file == "random.yaml" for p in e.problems)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.text(string.printable, min_size=1, max_size=40), pos=st.integers(0, 5000))
def test_cli_never_shows_a_traceback(tmp_path_factory, example_files, junk, pos):
    root = tmp_path_factory.mktemp("fleet")
    for name, text in example_files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_mangle(text, pos, 0, junk) if name == "clusters/metal.yaml" else text)
    r = CliRunner().invoke(app, ["validate", str(root)])
    assert r.exit_code in (0, 1)
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(1, 20), env=st.sampled_from(["dev", "staging", "prod"]), retention=st.sampled_from(["1d", "7d", "90d"]))
def test_resolve_deterministic_and_converged_plan_empty(example_files, workers, env, retention):
    files = dict(example_files)
    files["clusters/aws.yaml"] = files["clusters/aws.yaml"].replace(
        "variables: {environment: prod, workers: 6}", f"variables: {{environment: {env}, workers: {workers}}}")
    files["components/platform.yaml"] = files["components/platform.yaml"].replace("retention: 15d", f"retention: {retention}")
    a = resolve_all(load(files))
    b = resolve_all(load(dict(sorted(files.items(), reverse=True))))
    for name, d in a.items():
        assert d.hash == b[name].hash and d == b[name]
        assert plan(d, observed_from(d)).empty
