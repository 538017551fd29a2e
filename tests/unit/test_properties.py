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

# max_examples and derandomize come from the hypothesis profile (tests/unit/conftest.py): "ci" by default,
# HYPOTHESIS_PROFILE=deep for many more examples locally.
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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
            assert p.file in files and p.line > 0 and p.message, f"unlocated problem: {p}"


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
        assert all(p.file == "random.yaml" and p.line > 0 for p in e.problems), e.problems


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


# ----------------------------------------------------------------------------- located where the edit is

def _leaves(node, path=()):
    """(path, scalar node) for every scalar value under a composed YAML node."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _leaves(v, path + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _leaves(v, path + (i,))
    elif isinstance(node, yaml.ScalarNode) and node.style is None:
        yield path, node


def _typed_leaves(example_files):
    """Scalar values inside ``spec`` of every example document, with their file and 1-based line."""
    import yaml

    out = []
    for name, text in sorted(example_files.items()):
        for doc in yaml.compose_all(text):
            for path, node in _leaves(doc):
                # free-form maps (values, labels, variables) accept anything, so a wrong type is no error there
                if path[:1] == ("spec",) and not {"values", "labels", "matchLabels", "variables", "selector",
                                                   "description", "prefer", "tags"} & {str(x) for x in path}:
                    out.append((name, node.start_mark.line + 1, node.start_mark.index, node.end_mark.index, path))
    return out


def test_a_wrongly_typed_value_is_reported_at_its_line(example_files):
    """Replace one typed leaf with a mapping: the error names that file, within two lines of the edit."""
    leaves = _typed_leaves(example_files)
    outcomes = {"reported": 0, "accepted": 0}

    @FAST
    @given(i=st.integers(0, len(leaves) - 1))
    def check(i):
        name, line, start, end, path = leaves[i]
        files = dict(example_files)
        files[name] = files[name][:start] + "{fw-junk: [1, 2]}" + files[name][end:]
        try:
            load(files)
        except SpecInvalid as e:
            outcomes["reported"] += 1
            assert all(p.line > 0 for p in e.problems), e.problems
            near = [p for p in e.problems if p.file == name and abs(p.line - line) <= 2]
            assert near, f"edit at {name}:{line} ({'.'.join(map(str, path))}) reported as {e.problems}"
        else:
            outcomes["accepted"] += 1

    check()
    # a mapping where a scalar belongs is nearly always wrong: most edits must be caught
    assert outcomes["reported"] >= 2 * outcomes["accepted"], outcomes


def _valid_documents(example_files):
    import yaml

    docs = []
    for name, text in sorted(example_files.items()):
        if name.endswith((".yaml", ".yml")):  # not the .ics calendars
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _set_at(doc, path, value):
    import copy

    out = copy.deepcopy(doc)
    cur = out
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return out


def _paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,)
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield path + (i,)
            yield from _paths(v, path + (i,))


def test_random_subtrees_of_real_documents_reach_deep_validation(example_files):
    """A real document with one subtree of its spec replaced by random YAML: errors are located in it, deep down."""
    import yaml

    docs = [d for d in _valid_documents(example_files) if d["kind"] != "ComponentSet"]
    depth = {"deep": 0}

    @FAST
    @given(data=st.data())
    def check(data):
        doc = data.draw(st.sampled_from(docs))
        spec_paths = [p for p in _paths(doc) if p[0] == "spec" and len(p) >= 2]
        path = data.draw(st.sampled_from(spec_paths))
        mutated = _set_at(doc, path, data.draw(yaml_values))
        mutated["metadata"] = dict(mutated["metadata"], name=f"{doc['metadata']['name']}-fwrandom")
        files = dict(example_files)
        files["random.yaml"] = yaml.safe_dump(mutated, sort_keys=False)
        try:
            load(files)
        except SpecInvalid as e:
            assert all(p.line > 0 for p in e.problems), e.problems
            mine = [p for p in e.problems if p.file == "random.yaml"]
            assert mine or any(p.file != "random.yaml" for p in e.problems), e.problems
            if any(p.field.startswith("spec.") for p in mine):
                depth["deep"] += 1

    check()
    assert depth["deep"] > 0, "no random document reached validation below spec"
