"""Fuzzing the parsers of user files: policies, search specs and latency tables.

Whatever the input, only :class:`HwpruneError` may escape (a one-line message at the CLI); what parses must
be usable. Derandomized, so CI runs the same cases every time; the counts are printed.
"""
import copy
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwprune.errors import HwpruneError
from hwprune.latency import LatencyTable
from hwprune.policy import FORMATS, Policy
from hwprune.search.spec import SearchSpec, load_spec

CASES = {"policy": 0, "spec": 0, "table": 0}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

scalars = (st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_like = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                        max_size=4), max_leaves=12)


def _space():
    from hwprune.resolve import resolve
    from hwprune.space import build_space

    from test_search import DATA, MLP3

    s = resolve(MLP3, DATA, use_cache=False)
    return build_space(s.model, s.example, [])


SPACE = None

policy_dicts = st.fixed_dictionaries({}, optional={
    "format_version": st.just(1) | json_like,
    "keep": st.dictionaries(st.sampled_from(["0", "2", "fc", "x"]) | st.text(max_size=6),
                            st.floats(0.01, 1.0) | json_like, max_size=3) | json_like,
    "formats": st.dictionaries(st.sampled_from(["0", "2", "4", "y"]) | st.text(max_size=6),
                               st.sampled_from(FORMATS) | json_like, max_size=3) | json_like,
    "channel_multiple": st.integers(-2, 64) | json_like,
    "model": st.text(max_size=8) | json_like,
    "provenance": st.dictionaries(st.text(max_size=4), scalars, max_size=2) | json_like,
}) | json_like


@FUZZ
@given(policy_dicts)
def test_fuzz_policy(data):
    global SPACE
    CASES["policy"] += 1
    SPACE = SPACE or _space()
    try:
        pol = Policy.from_dict(json.loads(json.dumps(data)), source="fuzz")  # what a JSON file can hold
        pol.validate(SPACE)
        units = pol.units(SPACE)
    except HwpruneError:
        return
    assert all(1 <= units[g.name] <= g.units for g in SPACE.groups)


spec_fields = {f: json_like for f in SearchSpec.__dataclass_fields__}
spec_fields.update(budget=st.sampled_from(["50%", "10ms", "2.5 ms", "800us", "0.01s", "10", "-1ms", "", "fast"])
                   | json_like, trials=st.integers(-3, 50) | json_like, model=st.just("cnn1d") | json_like,
                   data=st.just("mnist1d") | json_like, sampler=st.sampled_from(["tpe", "nsga2", "random", "bayes"]))
spec_docs = (st.fixed_dictionaries({}, optional={**spec_fields, "unknown_key": json_like})
             .map(lambda d: yaml.safe_dump(json.loads(json.dumps(d, default=str)), allow_unicode=True))
             | st.text(max_size=80))


@FUZZ
@given(spec_docs)
def test_fuzz_spec(text):
    CASES["spec"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text)
        try:
            spec = load_spec(path)
            spec.validate()
        except HwpruneError:
            return
    assert spec.trials >= 1 and spec.model and spec.budget


def _valid_table():
    from test_latency import five_row_table

    t = five_row_table()
    t.models["mlp@4-m8"] = {"grid": [0.5, 1.0], "calibration": [
        {"policy": Policy({"0": 0.5}, {"2": "int8"}, 8).to_dict(), "measured_us": 12.0, "iqr_us": 0.5}]}
    return t.to_dict()


BASE = None


@st.composite
def table_docs(draw):
    """A valid table with one value somewhere replaced, deleted or retyped; or any JSON at all."""
    global BASE
    BASE = BASE or _valid_table()
    if draw(st.integers(0, 9)) == 0:
        return draw(json_like)
    doc = copy.deepcopy(BASE)
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        if draw(st.integers(0, 4)) == 0 and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = draw(json_like | st.sampled_from([-1, 0, float("nan"), float("inf"), "1.0", True]))
    return doc


@FUZZ
@given(table_docs(), st.integers(0, 3))
def test_fuzz_table(doc, cut):
    CASES["table"] += 1
    text = json.dumps(doc)
    if cut:  # truncated mid-write (what an atomic write never leaves, but a copy might)
        text = text[: len(text) * cut // 4]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.json"
        path.write_text(text)
        try:
            table = LatencyTable.load(path)
        except HwpruneError as exc:
            assert str(path) in str(exc)
            return
    assert all(e.median_us > 0 and e.iqr_us >= 0 for e in table.entries.values())


def test_fuzz_counts():
    """Runs after the fuzz tests (file order): how many cases each parser saw."""
    if not all(CASES.values()):
        pytest.skip("run with the fuzz tests")
    print(f"fuzz cases: policy {CASES['policy']}, spec {CASES['spec']}, table {CASES['table']}, "
          f"total {sum(CASES.values())}")
    assert all(n >= 300 for n in CASES.values())
