"""Keep ratios finer than the table's grid (issue 22, deliverable 3): searched as ordered parameters, their
layer configurations measured on demand before a trial trains, on the scale of the table's profile."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_cli
from test_search import DATA, MLP3

from hwprune.latency.table import Entry, LatencyTable


def test_a_meter_puts_new_entries_on_the_profiles_scale_and_keeps_the_old_ones(tmp_path, monkeypatch):
    """The dense model ran 50 us in this call's rounds and 100 us in the profile's: the machine runs twice as
    fast now, so an entry measured at 30 us is stored at 60 us; entries already in the table stay as they were."""
    import hwprune.latency.profiler as profiler
    from hwprune.latency.ondemand import ConfigMeter
    from hwprune.device.targets import get_target

    def fake_profile(scratch, todo, target, repeats, log, reference=None):
        for c in todo:
            scratch.entries[c.key] = Entry(30.0, 3.0, 10)
        scratch.save()  # profile_layers saves its chunks: the scratch table, never the real one
        return {"reference_us": [49.0, 50.0, 51.0]}

    monkeypatch.setattr(profiler, "profile_layers", fake_profile)
    monkeypatch.setattr(profiler, "model_sampler", lambda *a, **k: None)
    target = get_target("cpu", threads=1)
    table = LatencyTable(target.fingerprint(), 4, {"old": Entry(7.0, 0.5, 10)}, path=tmp_path / "ref.json")
    table.models["m"] = {"reference_layer_rounds": {"median_us": 100.0}}
    dest = tmp_path / "user" / "b4.json"
    meter = ConfigMeter(table, target, "m", None, None, dest)
    wanted = [SimpleNamespace(key="new"), SimpleNamespace(key="old")]
    monkeypatch.setattr(ConfigMeter, "missing", lambda self, p, pol: [c for c in wanted if c.key not in
                                                                      self.table.entries])
    pred = SimpleNamespace(stale=True)
    pred.entries_changed = lambda: setattr(pred, "stale", False)
    assert meter.measure(pred, None) == 1
    assert table.entries["new"].median_us == pytest.approx(60.0) and table.entries["new"].iqr_us == pytest.approx(6.0)
    assert table.entries["old"].median_us == 7.0 and meter.factors == [pytest.approx(2.0)]
    assert not pred.stale  # the interpolation sees the new entry
    saved = LatencyTable.load(dest)  # written to the user's folder, not where the table was read from
    assert saved.entries["new"].median_us == pytest.approx(60.0) and not (tmp_path / "ref.json").exists()
    assert meter.measure(pred, None) == 0  # nothing missing: nothing measured


def test_keep_ratios_off_the_grid_are_measured_before_their_trial_trains(tmp_path):
    """A real profile of a 3-layer MLP (32 + 32 hidden units, channel multiple 1) into an empty folder, then a
    search in steps of 1/16: the study records its 16 levels; every trained policy is priced from measured
    entries alone (a predictor that refuses missing entries gives the trial's own predicted latency), and some
    keep ratios off the profiled grid were trained. No seeds: the five trials are sampled (the seeds may all land on
    the profiled grid, as they did in CI); 9 of the 16 levels are off it, so five sampled two-group policies all on
    it is unlikely (about 0.19 ** 5 for independent uniform draws). The budget is the dense model's latency, so
    samples are trained as drawn: below it, every sample is projected onto the limit (repaired, then filled), and on
    this launch-bound MLP the projections collapsed onto the same on-grid policy in about a third of the runs."""
    import optuna
    import torch

    from hwprune.latency import Predictor, analyze_layers, model_key
    from hwprune.policy import Policy
    from hwprune.resolve import resolve

    tables, out = tmp_path / "tables", tmp_path / "run"
    proc = run_cli("search", "--model", MLP3, "--data", DATA, "--target", "cpu", "--budget", "100%", "--budget-margin", "0", "--batch-size",
                   "2048", "--channel-multiple", "1", "--tables", str(tables), "--finetune-steps", "3", "--trials", "5",
                   "--keep-levels", "16", "--no-uniform-seeds", "--out", str(out), "--json", env={"HWPRUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keep ratios in steps of 1/16 down to 0.0625" in proc.stderr
    measured = sum(int(n) for n in __import__("re").findall(r"measured (\d+) layer configuration", proc.stderr))
    assert measured > 0
    [path] = list(tables.rglob("b2048.json"))
    table = LatencyTable.load(path)
    [key] = list(table.models)
    grid = tuple(table.models[key]["grid"])
    study = optuna.load_study(study_name=json.loads(proc.stdout)["study"], storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    assert study.user_attrs["grid"] == [k / 16 for k in range(1, 17)]
    s = resolve(MLP3, DATA, use_cache=False)
    torch.manual_seed(0)
    layers = analyze_layers(s.model, s.example, [], 1)
    assert key == model_key(MLP3, {}, s.input_shape, [], 1)
    pred = Predictor(table, layers, key)  # allow_missing off: an unmeasured entry raises
    off = 0
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 5, [(t.number, t.state.name, t.user_attrs.get("error")) for t in study.trials]
    for t in done:
        pol = Policy.from_dict(t.user_attrs["policy"])
        assert pred.price(pol).latency_ms == pytest.approx(t.values[1], rel=1e-4)  # the file rounds entries
        assert t.values[1] <= json.loads(proc.stdout)["limit_ms"] + 1e-12
        units = pol.units(layers.space)
        off += any(u not in {round(r * 32) for r in grid} for u in units.values())
    assert off >= 1, [t.user_attrs["policy"] for t in done]
    # entries measured on demand (layers and casts off the grid) do not change the prices a resume checks
    more = run_cli("search", "--model", MLP3, "--data", DATA, "--target", "cpu", "--budget", "100%", "--budget-margin", "0", "--batch-size",
                   "2048", "--channel-multiple", "1", "--tables", str(tables), "--finetune-steps", "3", "--trials", "7",
                   "--keep-levels", "16", "--no-uniform-seeds", "--out", str(out), "--json", env={"HWPRUNE_CACHE": str(tmp_path / "c")})
    assert more.returncode == 0 and json.loads(more.stdout)["trials"] == 7, more.stderr[-2000:]
    print(f"{measured} configurations measured on demand; {off} of {len(done)} trials off the profiled grid")
