"""The CLI through a subprocess: user models and data, JSON summaries, one-line errors."""
import json

import pytest
import torch

from conftest import ASSETS, run_cli

USER_MODEL = f"{ASSETS / 'user_model.py'}:make_model"
USER_DATA = f"{ASSETS / 'user_model.py'}:make_data"


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("hwprune: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_user_model_and_data_through_inspect_and_apply(tmp_path):
    proc = run_cli("inspect", "--model", USER_MODEL, "--data", USER_DATA, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["input_shape"] == [1, 8, 8]
    assert [(g["name"], g["units"]) for g in info["groups"]] == [("0", 8), ("3", 16)]
    # conv 8*9+8, BN 16, conv 16*8*9+16, linear 16*3+3
    assert info["params"] == 80 + 16 + 1168 + 51
    assert info["flops"] == 6 * 6 * 8 * 9 + 2 * 6 * 6 * 8 + 4 * 4 * 16 * 8 * 9 + 16 * 3 + 4 * 4 * 16

    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"format_version": 1, "channel_multiple": 1, "keep": {"0": 0.5, "3": 0.25},
                                  "formats": {"7": "int8"}}))
    out = tmp_path / "pruned.pt"
    proc = run_cli("apply", "--model", USER_MODEL, "--data", USER_DATA, "--policy", str(policy),
                   "--finetune-steps", "3", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["params_before"] == 1315 and s["params_after"] == (4 * 9 + 4) + 2 * 4 + (4 * 4 * 9 + 4) + (4 * 3 + 3)
    assert s["flops_after"] < s["flops_before"]
    assert 0.0 <= s["val_accuracy_after"] <= 1.0 and s["units"] == {"0": 4, "3": 4}

    from hwprune import load_pruned
    model, meta = load_pruned(out, model=USER_MODEL)  # the caller names the user model: nothing else is imported
    assert meta["policy"]["keep"] == {"0": 0.5, "3": 0.25}
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert type(model[7]).__name__ == "FormatSim"


def test_apply_uniform_builtin_json_keys():
    proc = run_cli("apply", "--model", "resnet20", "--input-shape", "1,16,16", "--uniform", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["params_before"] == 272186  # ResNet-20 with 1 input channel
    assert s["params_after"] < s["params_before"] / 3
    assert s["flops_after"] < s["flops_before"] / 3
    assert "random init" in proc.stderr


@pytest.mark.parametrize("args,needles", [
    (["inspect", "--model", "resnet21"], ["'resnet21'", "known: cnn1d, gru, lstm, lstm-lm, mobilenetv2, resnet20"]),
    (["inspect", "--model", "cnn1d", "--data", "imagenet"], ["'imagenet'", "mnist1d, mnist5k, pydoc"]),
    (["inspect", "--model", "missing/file.py:make"], ["'missing/file.py'", "does not exist"]),
    (["inspect", "--model", f"{ASSETS / 'user_model.py'}:nothing", "--input-shape", "1,8,8"], ["no callable 'nothing'"]),
    (["inspect", "--model", f"{ASSETS / 'user_model.py'}:not_a_model", "--input-shape", "1,8,8"], ["returned int"]),
    (["inspect", "--model", USER_MODEL], ["needs --data or --input-shape"]),
    (["inspect", "--model", USER_MODEL, "--input-shape", "1,3,3"], ["(1, 3, 3) does not fit"]),
    (["inspect", "--model", "cnn1d", "--input-shape", "1,x"], ["'1,x'"]),
    (["apply", "--model", "cnn1d", "--uniform", "1.5"], ["1.5"]),
    (["apply", "--model", "cnn1d", "--uniform", "0.5", "--channel-multiple", "0"], ["positive integer", "'0'"]),
    (["train", "--model", "cnn1d", "--data", "mnist1d", "--train-batch-size", "0"], ["positive integer", "'0'"]),
    (["inspect", "--model", "lstm", "--model-args", "layers=2"], ["layers"]),
])
def test_bad_input_is_one_line(args, needles):
    _one_line_error(run_cli(*args), *needles)


def test_weights_that_do_not_match_name_the_key(tmp_path):
    from hwprune import build_model
    sd = build_model("cnn1d").state_dict()
    sd["fc.weight"] = torch.zeros(3, 128)
    torch.save(sd, tmp_path / "w.pt")
    _one_line_error(run_cli("inspect", "--model", "cnn1d", "--weights", str(tmp_path / "w.pt")),
                    "'fc.weight'", "(3, 128)")
    sd.pop("fc.weight")
    sd["extra.bias"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w2.pt")
    _one_line_error(run_cli("inspect", "--model", "cnn1d", "--weights", str(tmp_path / "w2.pt")), "'fc.weight'")


def test_train_caches_and_reports_test_accuracy(tmp_path):
    env = {"HWPRUNE_CACHE": str(tmp_path / "c")}
    proc = run_cli("train", "--model", "cnn1d", "--data", "mnist1d", "--epochs", "2", "--quiet", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["epochs"] == 2 and 0.5 < s["test_accuracy"] <= 1.0 and s["test_split"] == "test"
    assert len(s["val_history"]) == 2
    again = run_cli("train", "--model", "cnn1d", "--data", "mnist1d", "--epochs", "2", "--json", env=env)
    assert "using cached model" in again.stderr
    assert json.loads(again.stdout)["test_accuracy"] == s["test_accuracy"]
    assert json.loads(again.stdout)["weights"] == s["weights"] and s["weights"].endswith(".pt")
    plain = run_cli("train", "--model", "cnn1d", "--data", "mnist1d", env=env)  # the text summary of a cache hit
    assert plain.returncode == 0, plain.stderr
    assert f"test accuracy {s['test_accuracy']:.4f}" in plain.stdout and s["weights"] in plain.stdout
    # apply picks up the cached weights: accuracy well above chance before pruning
    ap = run_cli("apply", "--model", "cnn1d", "--data", "mnist1d", "--uniform", "0.75", "--json", env=env)
    assert ap.returncode == 0, ap.stderr
    assert json.loads(ap.stdout)["val_accuracy_before"] > 0.5


def _actions(cmd: str) -> dict:
    from hwprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return {flag: a for a in sub.choices[cmd]._actions for flag in a.option_strings}, sub.choices[cmd]


def test_cli_conventions_hold_for_every_command():
    """Closed sets have choices; one meaning per flag name (the training batch is --train-batch-size, the latency
    batch --batch-size; only the pricing commands have --allow-foreign-table); --device takes cuda:N; the model
    help lists every built-in model; every command's --help ends with an example of itself."""
    import argparse

    from hwprune.models import MODELS

    cmds = ("train", "inspect", "apply", "profile", "predict", "validate", "search", "pareto", "export")
    for cmd in cmds:
        acts, parser = _actions(cmd)
        assert parser.epilog and f"hwprune {cmd} " in parser.epilog, cmd
        for flag in ("--target", "--runtime", "--sampler", "--backend", "--format", "--importance", "--schedule"):
            if flag in acts:
                assert acts[flag].choices, (cmd, flag)
        if "--device" in acts:
            assert acts["--device"].type("cuda:1") == "cuda:1"
            with pytest.raises(argparse.ArgumentTypeError):
                acts["--device"].type("gpu0")
        if "--model" in acts:
            assert all(name in acts["--model"].help for name in MODELS.names()), cmd
        if "--batch-size" in acts:
            assert "latency" in acts["--batch-size"].help or "the latency is for" in acts["--batch-size"].help, cmd
        assert ("--allow-foreign-table" in acts) == (cmd in ("predict", "validate", "search")), cmd
        assert ("--table" in acts) == (cmd in ("predict", "validate", "search")), cmd
    assert "--train-batch-size" in _actions("train")[0] and "--batch-size" not in _actions("train")[0]
    assert "all" in _actions("profile")[0]["--runtime"].choices and "all" not in _actions("search")[0]["--runtime"].choices
