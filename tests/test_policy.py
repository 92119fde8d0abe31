import json

import pytest
import torch

from hwprune import HwpruneError, Policy, build_model, build_space, keep_units, load_policy, save_policy, uniform_policy


@pytest.mark.parametrize("ratio,units,mult,expected", [
    (0.5, 64, 8, 32), (0.1, 64, 8, 8), (0.3, 10, 1, 3), (1.0, 20, 8, 20), (0.01, 5, 1, 1),
    (0.55, 64, 8, 32), (0.6, 64, 8, 40), (0.2, 4, 8, 4), (0.99, 64, 8, 64),
])
def test_keep_units_rounds_to_multiple_and_never_below_one(ratio, units, mult, expected):
    assert keep_units(ratio, units, mult) == expected


@pytest.fixture(scope="module")
def space():
    m = build_model("cnn1d")
    return build_space(m, torch.randn(2, 1, 40))


def test_json_round_trip(tmp_path, space):
    p = Policy({"features.0": 0.5, "fc1": 0.25}, {"fc": "int8", "features.3": "bf16"}, 4, "cnn1d")
    save_policy(p, tmp_path / "p.json")
    q = load_policy(tmp_path / "p.json")
    assert q == p
    assert json.loads((tmp_path / "p.json").read_text())["format_version"] == 1
    assert q.units(space) == {"features.0": 16, "features.3": 64, "features.6": 64, "fc1": 32}


def test_uniform_policy_covers_every_group_and_layer(space):
    p = uniform_policy(space, 0.5, "int8")
    assert set(p.keep) == {g.name for g in space.groups}
    assert set(p.formats) == {q.name for q in space.layers} and set(p.formats.values()) == {"int8"}


@pytest.mark.parametrize("data,needle", [
    ({"format_version": 1, "keep": {"features.0": 1.5}}, "'features.0'"),
    ({"format_version": 1, "keep": {"features.0": 0}}, "'features.0'"),
    ({"format_version": 1, "keep": {"features.0": "half"}}, "'features.0'"),
    ({"format_version": 1, "formats": {"fc": "int3"}}, "'fc'"),
    ({"format_version": 2}, "format_version 2"),
    ({"format_version": 1, "colour": "red"}, "'colour'"),
    ({"format_version": 1, "channel_multiple": 0}, "channel_multiple"),
    ([1, 2], "JSON object"),
])
def test_malformed_policy_names_the_entry(data, needle):
    with pytest.raises(HwpruneError, match=needle.replace("(", r"\(")):
        Policy.from_dict(data)


def test_validation_against_model_names_the_entry(space):
    with pytest.raises(HwpruneError, match="'conv9'"):
        Policy({"conv9": 0.5}).validate(space)
    with pytest.raises(HwpruneError, match="'fc'"):  # the classifier is not a prunable group
        Policy({"fc": 0.5}).validate(space)
    with pytest.raises(HwpruneError, match="layer 'head'"):
        Policy(formats={"head": "int8"}).validate(space)
    with pytest.raises(HwpruneError, match="'fc1' to 'int4'.*offered: fp32, int8"):
        Policy(formats={"fc1": "int4"}).validate(space, allowed_formats=["fp32", "int8"])


def test_bad_policy_files(tmp_path):
    with pytest.raises(HwpruneError, match="does not exist"):
        load_policy(tmp_path / "missing.json")
    (tmp_path / "trunc.json").write_text('{"format_version": 1, "keep": {')
    with pytest.raises(HwpruneError, match="not valid JSON"):
        load_policy(tmp_path / "trunc.json")


def test_atomic_writes_follow_the_umask(tmp_path):
    import os
    import stat

    from hwprune._io import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind
