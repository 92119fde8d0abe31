"""Models as people write them (issue 21): several inputs, encoder-decoder RNNs, packed sequences,
sequence-first layers, cell loops, transposed convs, SE gating, a dilated TCN (models in assets/patterns.py).

For each: the groups derived by hand, dead units pruned with the outputs unchanged, the artifact reloaded equal
to the in-memory model; the layer prices keyed by layout; refusals in words with the source line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hwprune import inputs
from hwprune.apply import load_pruned, prune_model, save_pruned
from hwprune.errors import HwpruneError
from hwprune.policy import Policy
from hwprune.space import build_space, prepare_model, rnn_plans

from conftest import run_cli

ASSETS = Path(__file__).parent / "assets"
sys.path.insert(0, str(ASSETS))
import patterns as P  # noqa: E402

PAT = str(ASSETS / "patterns.py")


def _at(code: str) -> str:
    """``patterns.py:N (code)`` for the line of assets/patterns.py holding ``code`` (as messages quote it)."""
    for n, text in enumerate(Path(PAT).read_text().splitlines(), 1):
        if code in text:
            return f"patterns.py:{n} ({text.strip()[:60]}"
    raise AssertionError(code)

# model -> (data factory, {group: (units, layers)}) as derived by hand from the code in assets/patterns.py
HAND = {
    "seq2seq": ("seq2seq_data", {
        "src_emb": (16, ("src_emb", "encoder")),
        "encoder": (32, ("encoder", "decoder", "out")),  # the decoder starts from the encoder's h_n: one group
        "tgt_emb": (16, ("tgt_emb", "decoder"))}),
    "seq2seq_attn": ("seq2seq_data", {  # Luong attention: enc and dec outputs multiplied, [dec | context] -> out
        "src_emb": (16, ("src_emb", "encoder")),
        "encoder": (32, ("encoder", "decoder", "out")),
        "tgt_emb": (16, ("tgt_emb", "decoder"))}),
    "seq2seq2": ("seq2seq_data", {
        "src_emb": (16, ("src_emb", "encoder.layers.0")),
        "encoder.layers.0": (32, ("encoder.layers.0", "decoder.layers.0", "encoder.layers.1", "decoder.layers.1")),
        "encoder.layers.1": (32, ("encoder.layers.1", "decoder.layers.1", "out")),
        "tgt_emb": (16, ("tgt_emb", "decoder.layers.0"))}),
    "opennmt_gru": ("seq2seq_data", {  # OpenNMT-py's bi-GRU model: encoder, decoder and attention one group
        "embeddings": (8, ("embeddings", "encoder")),
        "encoder": (8, ("encoder", "decoder.rnn", "decoder.linear_in", "decoder.linear_out", "generator")),
        "decoder.embeddings": (8, ("decoder.embeddings", "decoder.rnn"))}),
    "packed_lstm": ("packed_data", {
        "lstm.layers.0": (32, ("lstm.layers.0", "lstm.layers.1")),
        "lstm.layers.1": (32, ("lstm.layers.1", "fc"))}),  # read from h_n[-1]
    "packed_gru": ("packed_data", {"gru": (32, ("gru", "fc"))}),  # pad_packed_sequence, / lengths[:, None]
    "seqfirst_lstm": ("seq_data", {
        "lstm.layers.0": (32, ("lstm.layers.0", "lstm.layers.1")),
        "lstm.layers.1": (32, ("lstm.layers.1", "fc"))}),
    "grucell": ("seq_data", {"cell": (32, ("cell", "fc"))}),
    "vanilla_rnn": ("seq_data", {"rnn.layers.0": (32, ("rnn.layers.0", "rnn.layers.1")),
                                 "rnn.layers.1": (32, ("rnn.layers.1", "fc"))}),
    "lstmcell": ("seq_data", {"cell": (32, ("cell", "fc"))}),  # torch.stack over steps, then fc
    "unet": ("seg_data", {
        "enc1.0": (16, ("enc1.0", "enc1.1", "enc2.0", "dec.0")),  # the skip concat: dec.0 reads it
        "enc2.0": (32, ("enc2.0", "enc2.1", "up")),  # ConvTranspose2d reads it (weight (in, out, k, k))
        "up": (16, ("up", "dec.0")),
        "dec.0": (16, ("dec.0", "dec.1", "head"))}),  # head: per-pixel logits, the output
    "se_cnn": ("image_data", {
        "c1.0": (16, ("c1.0", "c1.1", "se.fc1", "se.fc2", "c2.0")),  # SE: fc2's outputs gate the same channels
        "se.fc1": (4, ("se.fc1", "se.fc2")),
        "c2.0": (32, ("c2.0", "c2.1", "fc"))}),
    "tcn": ("tcn_data", {"net.0": (16, ("net.0", "net.2")), "net.2": (16, ("net.2", "net.4")),
                         "net.4": (16, ("net.4", "fc"))}),
}


def _example(data: str, n: int = 4):
    train = getattr(P, data)()[0]
    return inputs.collate([train[i][0] for i in range(n)])


@pytest.mark.parametrize("name", sorted(HAND))
def test_groups_are_the_ones_derived_by_hand(name):
    data, want = HAND[name]
    space = build_space(getattr(P, name)(), _example(data))
    got = {g.name: (g.units, g.layers) for g in space.groups}
    assert got == want


def test_dict_inputs_give_the_same_groups_as_a_tuple():
    space = build_space(P.seq2seq(), _example("seq2seq_dict_data"))
    assert {g.name: (g.units, g.layers) for g in space.groups} == HAND["seq2seq"][1]


def _kill_rnn_units(model: nn.Module, example, group: str, dead: torch.Tensor) -> None:
    """Make ``dead`` units of a recurrent group (and its coupled layers) irrelevant: zero their gate rows and
    biases, the recurrent columns that read them, and every reader's input columns."""
    plan = next(p for p in rnn_plans(model, example) if p.producer == group)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in (plan.producer,) + plan.coupled:
            m = mods[name]
            H = m.hidden_size
            for pname, p in m.named_parameters():
                g = p.shape[0] // H
                for k in range(g):
                    p[k * H + dead] = 0
                if pname.startswith("weight_hh"):
                    p[:, dead] = 0
        for name in plan.consumers:
            m = mods[name]
            w = m.weight if hasattr(m, "weight") else m.weight_ih_l0
            for d in range(plan.dirs * plan.copies(name)):
                w[:, d * plan.units + dead] = 0
            if isinstance(m, nn.GRU) or isinstance(m, nn.LSTM):
                for pname, p in m.named_parameters():
                    if pname.startswith("weight_ih"):
                        p[:, dead] = 0
        for name in plan.state_consumers:
            mods[name].weight[:, dead] = 0


@pytest.mark.parametrize("name,group", [("seq2seq", "encoder"), ("seq2seq2", "encoder.layers.0"),
                                        ("seq2seq_attn", "encoder"),
                                        ("packed_lstm", "lstm.layers.0"), ("packed_gru", "gru"),
                                        ("seqfirst_lstm", "lstm.layers.1"), ("grucell", "cell"),
                                        ("vanilla_rnn", "rnn.layers.0"), ("vanilla_rnn", "rnn.layers.1"),
                                        ("lstmcell", "cell")])
def test_dead_recurrent_units_are_pruned_without_changing_outputs(name, group):
    """Half the units made dead by hand; l1 importance ranks them last, pruning removes exactly them, and the
    pruned model computes what the dense one did (several inputs, coupled decoder, packed, cells)."""
    torch.manual_seed(0)
    data = HAND[name][0]
    model = prepare_model(getattr(P, name)())
    example = _example(data, 6)
    units = HAND[name][1][group][0]
    dead = torch.arange(0, units, 2)
    _kill_rnn_units(model, example, group, dead)
    coupled = next(p for p in rnn_plans(model, example) if p.producer == group).coupled
    pruned = prune_model(model, Policy({group: 0.5}, channel_multiple=1), example)
    sizes = {n: m.hidden_size for n, m in pruned.named_modules() if hasattr(m, "hidden_size")}
    assert sizes[group] == units // 2
    assert all(sizes[c] == units // 2 for c in coupled)  # a decoder started from the encoder keeps its units
    assert bool(coupled) == name.startswith("seq2seq")
    model.eval(), pruned.eval()
    with torch.no_grad():
        ref, got = inputs.call(model, example), inputs.call(pruned, example)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _kill_conv_channels(model: nn.Module, conv: str, bn: str | None, dead: torch.Tensor) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        c = mods[conv]
        if c.transposed:
            c.weight[:, dead] = 0
        else:
            c.weight[dead] = 0
        if c.bias is not None:
            c.bias[dead] = 0
        if bn:
            mods[bn].weight[dead] = 0
            mods[bn].bias[dead] = 0


@pytest.mark.parametrize("name,conv,bn", [("unet", "enc1.0", "enc1.1"), ("unet", "up", None),
                                          ("se_cnn", "c1.0", "c1.1"), ("tcn", "net.2", None)])
def test_dead_channels_are_pruned_without_changing_outputs(name, conv, bn):
    """Skip concat and ConvTranspose2d (U-Net), SE gating on both paths, dilated 'same' convs (TCN)."""
    torch.manual_seed(0)
    model = getattr(P, name)().eval()
    example = _example(HAND[name][0], 3)
    units = HAND[name][1][conv][0]
    _kill_conv_channels(model, conv, bn, torch.arange(1, units, 2))
    pruned = prune_model(model, Policy({conv: 0.5}, channel_multiple=1), example).eval()
    assert dict(pruned.named_modules())[conv].out_channels == units // 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(example), model(example), atol=1e-5, rtol=0)
    if name == "tcn":  # dilation and padding='same' survive pruning
        m = dict(pruned.named_modules())["net.2"]
        assert m.dilation == (2,) and m.padding == "same"


@pytest.mark.parametrize("name", ["seq2seq", "opennmt_gru", "packed_lstm", "lstmcell", "unet"])
def test_artifact_reloads_equal_to_the_in_memory_model(name, tmp_path):
    """pruned.pt keeps two example rows, so token ids and several inputs rebuild the pruned structure."""
    data, groups = HAND[name]
    model = getattr(P, name)()
    example = _example(data, 4)
    policy = Policy({g: 0.5 for g in groups}, channel_multiple=4)
    pruned = prune_model(model, policy, example).eval()
    ref = f"{PAT}:{name}"
    save_pruned(tmp_path / "p.pt", pruned, policy, ref, {}, inputs.shape_of(example), 0, (), {}, example)
    back, meta = load_pruned(tmp_path / "p.pt", model=ref)
    with torch.no_grad():
        torch.testing.assert_close(inputs.call(back, example), inputs.call(pruned, example), atol=0, rtol=0)
    assert meta["policy"]["keep"] == policy.to_dict()["keep"]


def test_a_cell_called_from_two_places_is_kept_whole_with_the_reason_in_words():
    space = build_space(P.two_places(), _example("seq_data"))
    msg = space.kept["cell"]
    assert "cell 'cell' (GRUCell) is called 20 times, but not as one loop over time" in msg
    assert "patterns.py:" in msg and "--exclude cell" in msg
    assert space.groups == []
    with pytest.raises(HwpruneError, match=r"nothing to prune: .*kept whole: cell; cell: cell 'cell' \(GRUCell\)"):
        from hwprune.space import check_prunable

        check_prunable(space)


def test_attention_reads_the_units_twice_and_a_foreign_query_is_kept_whole():
    """Luong attention: the head reads [dec | context], the units twice (columns j and H + j kept); a query
    from another producer multiplied with the encoder's outputs cannot be pruned alike: kept whole, line named."""
    example = _example("seq2seq_data")
    plan = next(p for p in rnn_plans(P.seq2seq_attn(), example) if p.producer == "encoder")
    assert plan.coupled == ("decoder",) and plan.copies("out") == 2
    pruned = prune_model(P.seq2seq_attn(), Policy({"encoder": 0.25}, channel_multiple=1), example)
    assert (pruned.encoder.hidden_size, pruned.decoder.hidden_size, pruned.out.in_features) == (8, 8, 16)

    class ForeignQuery(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(P.VOCAB, 8)
            self.encoder = nn.GRU(8, 16, batch_first=True)
            self.query = nn.Linear(8, 16)
            self.out = nn.Linear(8, P.VOCAB)

        def forward(self, src, tgt_in):
            enc, _ = self.encoder(self.emb(src))
            scores = torch.bmm(self.query(self.emb(tgt_in)), enc.transpose(1, 2))
            return self.out(torch.bmm(torch.softmax(scores, -1), self.emb(src)))

    space = build_space(ForeignQuery(), example)
    assert "encoder" not in {g.name for g in space.groups}
    assert "multiplied with" in space.kept["encoder"] and "test_patterns.py:" in space.kept["encoder"]


def test_layer_prices_follow_the_layout():
    """Sequence-first LSTMs are keyed 'tf' and timed (T, B, F); a packed layer at the padded length; a cell
    loop as one entry over the steps the trace saw; a ConvTranspose2d with its own output size."""
    from hwprune.latency import analyze_layers
    from hwprune.latency.layers import LayerConfig

    def configs(name, data):
        layers = analyze_layers(getattr(P, name)(), _example(data, 2))
        return {f.name: f.base for f in layers.layers}

    sf = configs("seqfirst_lstm", "seq_data")["lstm.layers.0"]
    assert sf.time_first and sf.extent == (10,) and "|uni|tf|" in sf.key
    mod, x = sf.build()
    assert mod.batch_first is False and tuple(x.shape) == (10, 1, 6)
    assert LayerConfig.from_key(sf.key) == sf
    packed = configs("packed_lstm", "packed_data")
    assert packed["lstm.layers.0"].extent == (12,)  # the padded length, not the example's longest
    plain = configs("vanilla_rnn", "seq_data")["rnn.layers.1"]
    assert plain.op == "rnnrelu" and plain.macs() == 10 * 32 * (32 + 32) and LayerConfig.from_key(plain.key) == plain
    assert plain.build()[0].nonlinearity == "relu"
    cell = configs("grucell", "seq_data")["cell"]
    assert cell.op == "grucell" and cell.extent == (10,) and cell.macs() == 3 * 32 * (6 + 32) * 10
    up = configs("unet", "seg_data")["up"]
    assert up.op == "convt2d" and up.out_extent() == (16, 16) and LayerConfig.from_key(up.key) == up
    m, x = up.build()
    assert tuple(m(x).shape[2:]) == up.out_extent()


def test_flops_count_every_step_of_a_cell_loop():
    from hwprune.measure import count_flops

    ex = _example("seq_data", 1)
    assert count_flops(P.grucell(), ex) == 10 * 3 * 32 * (6 + 32) + 32 * 6


def test_items_must_be_inputs_target_pairs_in_words(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\ndef data():\n    d = [(torch.zeros(3), torch.zeros(3), 1)] * 4\n    return d, d\n")
    proc = run_cli("inspect", "--model", f"{PAT}:grucell", "--data", f"{bad}:data")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "items must be (inputs, target) pairs, where inputs is a tensor, a tuple/list of tensors or a dict" \
        in proc.stderr and "got tuple of 3" in proc.stderr


def test_cache_key_follows_the_user_files_content(tmp_path):
    from hwprune.train import cache_key

    f = tmp_path / "m.py"
    f.write_text("def m():\n    pass\n")
    a = cache_key(f"{f}:m", "mnist1d", 0, {})
    f.write_text("def m():\n    return 1\n")
    assert cache_key(f"{f}:m", "mnist1d", 0, {}) != a
    assert cache_key("cnn1d", "mnist1d", 0, {}) == cache_key("cnn1d", "mnist1d", 0, {})


def test_ray_worker_keeps_the_users_task():
    """A worker rebuilds the setup from the spec: the user's task and class count come along (they once fell
    back to classification on a Ray cluster)."""
    from hwprune.search.ray_backend import worker_setup
    from hwprune.search.spec import SearchSpec
    from hwprune.resolve import resolve

    task = f"{PAT}:pixel_task"
    driver = resolve(f"{PAT}:unet", f"{PAT}:seg_data", None, {}, None, 0, use_cache=False, task=task)
    spec = SearchSpec(model=f"{PAT}:unet", data=f"{PAT}:seg_data", task=task, budget="90%")
    setup, _ = worker_setup(spec, driver.model.state_dict())
    assert setup.task.metric == "pixel accuracy" and setup.task.direction == "max"


E2E = [pytest.param(n, t, marks=[pytest.mark.slow, pytest.mark.e2e])
       for n, t in [("seq2seq", "language-model"), ("seq2seq2", "language-model"),
                    ("seq2seq_attn", "language-model"), ("opennmt_gru", "language-model"), ("packed_lstm", None),
                    ("packed_gru", None), ("seqfirst_lstm", None), ("grucell", None), ("lstmcell", None),
                    ("vanilla_rnn", None), ("unet", f"{PAT}:pixel_task"), ("se_cnn", None), ("tcn", None)]]


@pytest.mark.parametrize("name,task", E2E)
def test_inspect_profile_search_export_end_to_end(name, task, tmp_path):
    """Each pattern through the CLI, tiny counts ('make test-e2e', CI); the exported pruned.pt reloads with the
    policy's units. 'make test' covers the same code in process (groups, pruning, artifacts, formats)."""
    data = HAND[name][0]
    env = {"HWPRUNE_CACHE": str(tmp_path / "cache")}
    common = ["--model", f"{PAT}:{name}", "--data", f"{PAT}:{data}"] + (["--task", task] if task else [])
    ins = run_cli("inspect", *common, "--json", env=env)
    assert ins.returncode == 0, ins.stderr
    assert {g["name"] for g in json.loads(ins.stdout)["groups"]} == set(HAND[name][1])
    tables = ["--tables", str(tmp_path / "tables"), "--target", "cpu"]
    prof = run_cli("profile", *common, *tables, "--batch-size", "64", "--repeats", "3", "--calibration", "3",
                   "--grid", "0.25,0.5,1", env=env)
    assert prof.returncode == 0, prof.stderr
    out = tmp_path / "run"
    # an absolute budget far above every pattern (each under ~5 ms at batch 64), margin 0: the pattern's flow is
    # what is tested, not the budget. A share of dense was not enough: a launch-bound pattern (the GRUCell loop)
    # priced its smallest policy at 100% of dense in CI, and the packed GRU's smallest measured 240% of dense in
    # the speed check of one CI run (66% at profiling), so "100%" was refused
    srch = run_cli("search", *common, *tables, "--batch-size", "64", "--budget", "1000ms", "--budget-margin", "0",
                   "--trials", "2",
                   "--finetune-steps", "5", "--out", str(out), "--json", env=env)
    assert srch.returncode == 0, srch.stderr
    exp = run_cli("export", str(out), "--trust-code", "--trial", "best", "--finetune-steps", "5", "--repeats", "3", env=env)
    assert exp.returncode == 0, exp.stderr
    dest = next(out.glob("export-*"))
    report = json.loads((dest / "export.json").read_text())
    assert report["measured_latency_ms"] > 0 and report["predicted_latency_ms"] > 0
    model, meta = load_pruned(dest / "pruned.pt", trust_code=True)  # token ids and two inputs: rebuilt from the stored rows
    assert meta["policy"] == report["policy"]
    width = lambda m: next((getattr(getattr(m, "inner", m), a) for a in  # noqa: E731 - a FormatSim wraps a layer
                            ("hidden_size", "out_channels", "out_features", "embedding_dim")
                            if hasattr(getattr(m, "inner", m), a)), None)
    mods = dict(model.named_modules())
    assert report["units"] and all(width(mods[g]) == n for g, n in report["units"].items())


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_formats_run_on_packed_sequences(fmt):
    """Simulated and deployed int8/bf16 layers take a PackedSequence (cast or quantize its data): every search
    trial of a packed model once failed on it."""
    from hwprune.apply import apply_policy
    from hwprune.device.deploy import deploy

    model = P.packed_lstm().eval()
    example = _example("packed_data", 8)
    with torch.no_grad():
        ref = inputs.call(model, example)
        sim = apply_policy(model, Policy({}, formats={"lstm.layers.0": fmt, "lstm.layers.1": fmt}), example).eval()
        got = inputs.call(sim, example)
        deployed, rep = deploy(sim, "cpu", example)
        real = inputs.call(deployed, example)
    assert not rep.simulated
    assert float((got - ref).abs().max()) < 5e-2 and float((real - ref).abs().max()) < 5e-2
    assert not torch.equal(real, ref)  # the format did something


def test_taylor_importance_differentiates_the_tasks_loss():
    """Taylor scores of a seq2seq (per-token logits (B, T, V)) come from the task's loss; cross-entropy on the
    raw output cannot even be computed there."""
    from hwprune.tasks import get_task
    from hwprune.train import few_batches

    train = P.seq2seq_data()[0]
    example = _example("seq2seq_data")
    batches = few_batches(train, n=2, batch_size=16)
    policy = Policy({"encoder": 0.5}, channel_multiple=1)
    with pytest.raises(Exception):
        prune_model(P.seq2seq(), policy, example, importance="taylor", batches=batches)
    pruned = prune_model(P.seq2seq(), policy, example, importance="taylor", batches=batches,
                         loss=get_task("language-model").loss)
    assert pruned.encoder.hidden_size == pruned.decoder.hidden_size == 16


def test_wrapped_rnn_keeps_the_lstm_api_after_splitting_and_pruning():
    """SpeechBrain's CRDNN calls flatten_parameters() on its LSTM in every forward: hwprune's per-layer stack
    keeps that API, so the model is analysed, pruned (each layer's hidden units by hand: 16 -> 8, the head's
    input 2 directions x 8) and runs; at keep 1.0 it computes what the dense model did."""
    torch.manual_seed(0)
    model = P.wrapped_lstm()
    x = torch.randn(4, 7, 6)
    space = build_space(model, x)
    assert {g.name: g.units for g in space.groups} == {"rnn.layers.0": 16, "rnn.layers.1": 16}
    pruned = prune_model(model, Policy({"rnn.layers.0": 0.5, "rnn.layers.1": 0.5}, channel_multiple=1), x).eval()
    assert [m.hidden_size for m in pruned.rnn.layers] == [8, 8] and pruned.head.in_features == 16
    assert pruned.rnn.layers[1].input_size == 16 and pruned.rnn.num_layers == 2 and pruned.rnn.bidirectional
    assert pruned(x).shape == (4, 3)
    same = prune_model(model, Policy({}, channel_multiple=1), x).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), atol=1e-6, rtol=0)


def test_an_rnn_api_gap_names_the_split_not_the_input():
    """A model reading an nn.LSTM attribute the per-layer stack lacks: the dense model runs on the input, so the
    error names the split layer and says it is hwprune's gap, not that the input does not fit."""
    with pytest.raises(HwpruneError) as err:
        build_space(P.needs_stack_attr(), torch.randn(2, 5, 6))
    msg = str(err.value)
    assert "runs, but not with its multi-layer RNN(s) 'rnn' split" in msg and "weight_hh_l1" in msg
    assert "does not fit" not in msg and "\n" not in msg
    with pytest.raises(HwpruneError, match="does not fit the model"):  # a wrong input is still the input's fault
        build_space(P.needs_stack_attr(), torch.randn(2, 5, 4))


# groups by hand: a grouped 3x3 ties s1.N.a's outputs and s1.N.b's outputs per group of 8 (kept whole, said);
# the stem's channels feed s1.0.a and s1.0.proj (1x1s, free); the residual stream runs through c and proj
CNN_HAND = {
    "regnetx": ({"stem.0": 16, "s1.0.c.0": 32},
                {"s1.0.a.0": "grouped convolution 's1.0.b.0' at patterns.py:", "s1.0.b.0": "groups=4",
                 "s1.1.a.0": "grouped convolution 's1.1.b.0'", "s1.1.b.0": "tied per group"}),
    # the branches' insides (1x1 -> depthwise -> 1x1) are groups; the shuffled stream of stage2.1 is not
    "shufflenet": ({"conv1.0": 8, "stage2.0.branch2.0": 8, "stage2.1.branch2.0": 8, "conv5.0": 32},
                   {"stage2.1.branch2.5": "channel shuffle"}),
    # three units, as torchvision's stages: Torch-Pruning's graph divided by zero for the whole model; the
    # reshape is left unmapped and the branches' insides still prune
    "shufflenet3": ({"conv1.0": 8, "stage2.0.branch2.0": 8, "stage2.1.branch2.0": 8, "stage2.2.branch2.0": 8,
                     "conv5.0": 32}, {"stage2.2.branch2.5": "do not fit"}),
}


@pytest.mark.parametrize("name", sorted(CNN_HAND))
def test_grouped_convs_and_channel_shuffles_are_kept_whole_and_the_rest_prunes(name):
    """RegNet's grouped convolutions crashed apply (Torch-Pruning indexed the grouped weight as dense) and
    ShuffleNetV2's channel shuffle made its indices run out of range: each such group is kept whole with the
    reason (and the source line where the grouped conv is built), every other group is listed by hand, and
    apply cuts each listed group alone, the model running with the dense model's output shape."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    groups, kept = CNN_HAND[name]
    space = build_space(getattr(P, name)(), x)
    assert {g.name: g.units for g in space.groups} == groups
    for layer, words in kept.items():
        assert words in space.kept[layer], space.kept
    model = getattr(P, name)().eval()
    for g in space.groups:
        pruned = prune_model(model, Policy({g.name: 0.5}, channel_multiple=1), x).eval()
        assert dict(pruned.named_modules())[g.name].out_channels == g.units // 2
        with torch.no_grad():
            assert pruned(x).shape == model(x).shape == (2, 4)


@pytest.mark.parametrize("name,group,bn", [("regnetx", "stem.0", "stem.1"),
                                           ("shufflenet", "stage2.0.branch2.0", "stage2.0.branch2.1")])
def test_dead_channels_beside_grouped_convs_and_shuffles_prune_exactly(name, group, bn):
    """Half a group's channels made dead by hand (BatchNorm scale and shift 0, then ReLU: exact zeros):
    pruning removes exactly them and the model computes what it did."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = getattr(P, name)().eval()
    units = CNN_HAND[name][0][group]
    _kill_conv_channels(model, group, bn, torch.arange(0, units, 2))
    pruned = prune_model(model, Policy({group: 0.5}, channel_multiple=1), x).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(HAND) + ["wrapped_lstm"])
def test_every_listed_group_can_be_cut(name):
    """inspect lists only groups apply can cut: each group of each pattern pruned alone to half, the model runs
    and gives the dense model's output shape."""
    torch.manual_seed(0)
    example = _example(HAND[name][0], 3) if name in HAND else torch.randn(3, 7, 6)
    model = prepare_model(getattr(P, name)()).eval()
    space = build_space(model, example)
    assert space.groups
    with torch.no_grad():
        want = inputs.call(model, example).shape
    for g in space.groups:
        pruned = prune_model(model, Policy({g.name: 0.5}, channel_multiple=1), example).eval()
        with torch.no_grad():
            assert inputs.call(pruned, example).shape == want, g.name


VIEW_HAND = {  # model -> (input, {group: units}, {kept layer: words its reason must hold})
    # the encoder's channels cross the mask's .view (sources x feats): kept; the separator's insides prune
    "convtasnet": ((2, 1, 64), {"bottleneck": 8, "blocks.0.net.0": 16, "blocks.1.net.0": 16},
                   {"encoder": _at("e = self.encoder(x)")}),
    # the residual stream is the input's width and the GLU's halves are not followed: kept; the feed-forward
    # modules' inner widths prune
    "conformer": ((2, 10, 16), {"blocks.0.ff1.1": 32, "blocks.0.ff2.1": 32, "blocks.1.ff1.1": 32,
                                "blocks.1.ff2.1": 32},
                  {"blocks.0.ff1.3": "x = x + 0.5 * self.ff1(x)",
                   "blocks.0.pw1": _at("x = x + self.pw2(nn.functional.silu(")[:-1],
                   "blocks.1.pw1": "expected input"}),
}


@pytest.mark.parametrize("name", sorted(VIEW_HAND))
def test_groups_the_graph_gets_wrong_are_kept_whole_with_the_failing_line(name):
    """ConvTasNet's mask .view and Conformer's input-fed residual and GLU made apply crash on groups inspect
    had listed: each group is now cut alone while the space is built, one that breaks the model is kept whole
    with the user's line that failed, the others are listed (by hand), each cuts alone to the dense output
    shape, and building the space leaves the model as it was (weights and outputs)."""
    torch.manual_seed(0)
    shape, groups, kept = VIEW_HAND[name]
    x = torch.randn(*shape)
    model = getattr(P, name)().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(x)
    space = build_space(model, x)
    assert {g.name: g.units for g in space.groups} == groups
    assert set(kept) <= set(space.kept), space.kept
    for layer, words in kept.items():
        assert words in space.kept[layer], space.kept[layer]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=0, rtol=0)
    for g in space.groups:
        pruned = prune_model(model, Policy({g.name: 0.5}, channel_multiple=1), x).eval()
        with torch.no_grad():
            assert pruned(x).shape == y.shape, g.name


def test_dead_feed_forward_units_of_a_conformer_prune_exactly():
    """Half the inner units of a Conformer feed-forward made dead (their Linear rows and biases 0: SiLU(0) = 0):
    pruning that group removes exactly them, to hand-worked widths, and the model computes what it did."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    model = P.conformer().eval()
    lin = model.blocks[0].ff1[1]
    with torch.no_grad():
        lin.weight[0::2] = 0
        lin.bias[0::2] = 0
    pruned = prune_model(model, Policy({"blocks.0.ff1.1": 0.5}, channel_multiple=1), x).eval()
    assert pruned.blocks[0].ff1[1].weight.shape == (16, 16) and pruned.blocks[0].ff1[3].weight.shape == (16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=1e-5)


def test_deepspeech_directions_added_by_slicing_prune_alike():
    """DeepSpeech adds its bidirectional RNN's halves (x[:, :, :n] + x[:, :, n:]): with n taken from the output,
    the RNN's hidden units are one group whose reader (fc4) sees one n-wide block; the Linear layers around it
    (through ReLU, hardtanh, dropout, squeeze, transpose) are groups. Hand-worked: every group 16 wide; the RNN at
    8 units keeps input 16 -> hidden 8 per direction and fc4 reads 8. Units made dead in both directions (their
    input rows, recurrent rows and biases 0: ReLU RNN outputs exactly 0) prune with the outputs unchanged."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 7, 12)
    model = P.deepspeech_sized().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {
        "fc1.fc": (16, ("fc1.fc", "fc2.fc")), "fc2.fc": (16, ("fc2.fc", "fc3.fc")),
        "fc3.fc": (16, ("fc3.fc", "bi_rnn")), "bi_rnn": (16, ("bi_rnn", "fc4.fc")),
        "fc4.fc": (16, ("fc4.fc", "out"))}
    rnn = model.bi_rnn
    dead = torch.arange(1, 16, 2)
    with torch.no_grad():
        for sfx in ("", "_reverse"):
            for p in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(rnn, p + sfx)[dead] = 0
            getattr(rnn, "weight_hh_l0" + sfx)[dead] = 0
            getattr(rnn, "weight_hh_l0" + sfx)[:, dead] = 0
    pruned = prune_model(model, Policy({"bi_rnn": 0.5}, channel_multiple=1), x).eval()
    assert (pruned.bi_rnn.input_size, pruned.bi_rnn.hidden_size) == (16, 8)
    assert pruned.fc4.fc.weight.shape == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_deepspeech_with_its_width_fixed_keeps_the_rnn_whole_and_prunes_the_rest():
    """torchaudio's DeepSpeech slices with self.n_hidden, a number the pruned RNN no longer matches: the RNN is
    kept whole with the line that fails, and the Linear layers around it still prune (before: nothing did)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 7, 12)
    model = P.deepspeech().eval()
    space = build_space(model, x)
    assert [g.name for g in space.groups] == ["fc1.fc", "fc2.fc", "fc3.fc", "fc4.fc"]
    assert _at("x = x[:, :, :n] + x[:, :, n:]") in space.kept["bi_rnn"], space.kept
    pruned = prune_model(model, Policy({"fc1.fc": 0.5, "fc4.fc": 0.25}, channel_multiple=1), x).eval()
    assert pruned.fc1.fc.out_features == 8 and pruned.fc4.fc.out_features == 4
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 7, 5)


def _silence(rnn: nn.Module, units: torch.Tensor) -> None:
    """Zero every weight and bias of ``units`` of an LSTM/GRU layer (both directions, all gates) and their columns
    in the recurrent weights: from a zero state those units stay 0 (LSTM: c = 0; GRU: h = (1 - z) * 0 + z * h)."""
    H = rnn.hidden_size
    gates = 4 if isinstance(rnn, nn.LSTM) else 3
    rows = torch.cat([g * H + units for g in range(gates)])
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            p[rows] = 0
            if name.startswith("weight_hh"):
                p[:, units] = 0


def test_opennmt_encoder_and_decoder_prune_as_one_group_through_the_joined_directions():
    """OpenNMT-py's decoder starts from the bidirectional encoder's state with its directions joined
    (``cat([h[0:n:2], h[1:n:2]], 2)``: the decoder's units are [fwd | bwd] of the encoder's) and runs general
    attention over the memory bank (``bmm(linear_in(out), mb.transpose(1, 2))``, ``[context | out]`` into
    linear_out). Before, the encoder was kept whole at the strided slice and the decoder at the cat: only the
    embeddings and the attention output pruned. Now encoder, decoder and linear_in are one group, each kept
    encoder unit kept in both halves of the decoder; the shapes worked by hand; units that carry nothing
    (zeroed everywhere) go first and the output is unchanged."""
    torch.manual_seed(0)
    x = (torch.randint(0, 20, (6, 3)), torch.randint(0, 20, (5, 3)))
    model = P.opennmt().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {
        "encoder.embeddings": (8, ("encoder.embeddings", "encoder.rnn")),
        "encoder.rnn": (8, ("encoder.rnn", "decoder.rnn", "decoder.linear_in", "decoder.linear_out")),
        "decoder.embeddings": (8, ("decoder.embeddings", "decoder.rnn")),
        "decoder.linear_out": (16, ("decoder.linear_out", "decoder.generator"))}
    assert space.kept == {}
    dead = torch.arange(1, 8, 2)  # encoder units 1, 3, 5, 7: in the decoder, 1, 3, 5, 7 and 9, 11, 13, 15
    sides = torch.cat([dead, dead + 8])
    _silence(model.encoder.rnn, dead)
    _silence(model.decoder.rnn, sides)
    with torch.no_grad():
        model.decoder.linear_in.weight[sides] = 0
        model.decoder.linear_in.weight[:, sides] = 0
        model.decoder.linear_out.weight[:, torch.cat([sides, sides + 16])] = 0
    pruned = prune_model(model, Policy({"encoder.rnn": 0.5}, channel_multiple=1), x).eval()
    assert (pruned.encoder.rnn.hidden_size, pruned.encoder.rnn.bidirectional) == (4, True)
    assert (pruned.decoder.rnn.input_size, pruned.decoder.rnn.hidden_size) == (8, 8)
    assert pruned.decoder.linear_in.weight.shape == (8, 8)
    assert pruned.decoder.linear_out.weight.shape == (16, 16)  # [context | out]: 8 + 8 columns
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), model(*x), atol=1e-5, rtol=1e-5)
    for g in space.groups:
        cut = prune_model(model, Policy({g.name: 0.5}, channel_multiple=1), x).eval()
        with torch.no_grad():
            assert cut(*x).shape == model(*x).shape == (3, 5, 20)


def test_opennmt_attention_output_reshaped_with_the_memory_banks_width_is_cut_with_the_units():
    """OpenNMT-py's GlobalAttention reshapes its output with the memory bank's width, ``linear_out(...).view(batch,
    tgt_len, dim)``: cut alone, either side fails there. The encoder group is tried again with linear_out's
    outputs tied to its [fwd | bwd] indices, and its reader (the generator) with them; pruning finds the same tie
    (Space.ties) and the output is unchanged where the cut units carry nothing."""
    torch.manual_seed(0)
    x = (torch.randint(0, 12, (3, 6)), torch.randint(0, 12, (3, 5)))
    model = P.opennmt_gru().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {
        "embeddings": (8, ("embeddings", "encoder")),
        "encoder": (8, ("encoder", "decoder.rnn", "decoder.linear_in", "decoder.linear_out", "generator")),
        "decoder.embeddings": (8, ("decoder.embeddings", "decoder.rnn"))}
    assert space.ties == {"encoder": ("decoder.linear_out",)} and space.kept == {}
    dead = torch.arange(0, 8, 2)
    sides = torch.cat([dead, dead + 8])
    _silence(model.encoder, dead)
    _silence(model.decoder.rnn, sides)
    with torch.no_grad():
        model.decoder.linear_in.weight[sides] = 0
        model.decoder.linear_in.weight[:, sides] = 0
        model.decoder.linear_out.weight[sides] = 0
        model.decoder.linear_out.weight[:, torch.cat([sides, sides + 16])] = 0
        model.generator.weight[:, sides] = 0
    pruned = prune_model(model, Policy({"encoder": 0.5}, channel_multiple=1), x).eval()
    assert pruned.encoder.hidden_size == 4 and pruned.decoder.rnn.hidden_size == 8
    assert pruned.decoder.linear_out.weight.shape == (8, 16) and pruned.generator.weight.shape == (12, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), model(*x), atol=1e-5, rtol=1e-5)


def test_fairseq_packing_through_the_module_traces_and_its_fixed_state_is_named():
    """fairseq calls nn.utils.rnn.pack_padded_sequence(x, src_lengths.cpu()) through the module: the trace
    failed (`__cuda_array_interface__` must be a dict). It is now one traced call, the module's function put
    back after; x.new_zeros(...) reads no features; the LSTM, whose state is built with self.hidden_size, is
    kept whole with that line; the embedding prunes, dead columns exactly (the LSTM input they fed is 0)."""
    import torch.nn.utils.rnn as rnn_utils

    original = rnn_utils.pack_padded_sequence
    torch.manual_seed(0)
    x = (torch.randint(1, 20, (3, 6)), torch.tensor([6, 4, 2]))
    model = P.fairseq_lstm().eval()
    space = build_space(model, x)
    assert rnn_utils.pack_padded_sequence is original
    assert {g.name: (g.units, g.layers) for g in space.groups} == {"embed_tokens": (8, ("embed_tokens", "lstm"))}
    assert _at("_, (final_hiddens, _) = self.lstm(packed_x, (h0, c0))") in space.kept["lstm"], space.kept
    with torch.no_grad():
        model.embed_tokens.weight[:, 1::2] = 0
    pruned = prune_model(model, Policy({"embed_tokens": 0.5}, channel_multiple=1), x).eval()
    assert pruned.embed_tokens.weight.shape == (20, 4) and pruned.lstm.input_size == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), model(*x), atol=1e-6, rtol=1e-5)


def test_concatenated_expands_prune_all_at_once_after_the_cut_checks():
    """SqueezeNet's Fire modules concatenate two expands: the space's cut checks once left Torch-Pruning's concat
    offsets shifted (a list mutated in place), so cutting every group together then failed. Every group at half
    at once: hand-worked widths (squeeze 8 -> 4, expands 16 -> 8 each, the next squeeze reads 8 + 8), the model
    runs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = P.squeezenet().eval()
    space = build_space(model, x)
    assert {g.name: g.units for g in space.groups} == {
        "stem": 16, "fire1.squeeze": 8, "fire1.expand1x1": 16, "fire1.expand3x3": 16, "fire2.squeeze": 8,
        "fire2.expand1x1": 16, "fire2.expand3x3": 16}
    pruned = prune_model(model, Policy({g.name: 0.5 for g in space.groups}, channel_multiple=1), x).eval()
    assert pruned.fire2.squeeze.weight.shape == (4, 16, 1, 1) and pruned.fire1.expand3x3.weight.shape == (8, 4, 3, 3)
    assert pruned.fc.weight.shape == (4, 16)
    with torch.no_grad():
        assert pruned(x).shape == (2, 4)
    from hwprune.space._cnn import cnn_groups

    dg, groups = cnn_groups(model, x, set())  # the graph the checks cut and restored still cuts right
    for g in groups:
        dg.get_pruning_group(g.root, g.handler, idxs=list(range(0, g.units, 2))).prune()
    with torch.no_grad():
        assert model(x).shape == (2, 4) and model.fire2.squeeze.in_channels == 16


def test_torch_prunings_reshape_map_is_put_back():
    """The reshape index map is wrapped only while hwprune uses Torch-Pruning's graph (a three-unit ShuffleNet
    needs it), then the library's own function is back."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    build_space(P.shufflenet3(), torch.randn(2, 3, 16, 16))
    assert index_mapping.update_reshape_index_mapping is original



def test_a_layernorm_over_frequency_and_channels_keeps_its_conv_whole_and_the_rest_prunes():
    """SpeechBrain's CRDNN normalizes its convolutions' channels with LayerNorm over (frequency, channels)
    together: Torch-Pruning cut one dimension of it, and scoring the group failed with a traceback
    (``Index tensor must have the same number of dimensions``). conv1 is kept whole, naming that LayerNorm and
    its line; conv2 (-> fc) and fc (-> out) are the groups, and conv2's dead channels prune exactly."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6)
    model = P.sb_conv().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {"conv2": (8, ("conv2", "fc")),
                                                                    "fc": (16, ("fc", "out"))}
    why = space.kept["conv1"]
    assert "'norm1'" in why and "(6, 8)" in why and _at("self.norm1 = nn.LayerNorm((feats, ch))") in why
    with torch.no_grad():  # odd channels of conv2 dead, and fc's columns reading them zero
        model.conv2.weight[1::2] = 0
        model.conv2.bias[1::2] = 0
        model.fc.weight[:, 1::2] = 0
    pruned = prune_model(model, Policy({"conv2": 0.5}, channel_multiple=1), x).eval()
    assert pruned.conv2.out_channels == 4 and pruned.fc.in_features == 4 and pruned.conv1.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=1e-5)
    pruned = prune_model(model, Policy({"fc": 0.5}, channel_multiple=1), x).eval()
    assert pruned.fc.out_features == 8 and pruned.out.in_features == 8
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (3, 7, 5)


def test_speechbrain_crdnn_convs_prune_through_layernorm_over_frequency_and_channels():
    """SpeechBrain's CRDNN: its convs' channels reach a LayerNorm over (frequency, channels) in channels-last
    layout, a squeeze(1) that squeezes nothing, padding of frequency and time, pooling over frequency, and a
    reshape to (batch, time, freq * channels) whose channels are the minor index. Before, every conv was kept whole
    (the e2e CRDNN-GRU could not go under 71% of dense). Now the conv is a group: the LayerNorm is cut along its
    channel axis, and the GRU reads channel c of frequency bin f at column f * C + c, worked out by hand."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6)
    model = P.sb_crdnn().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {
        "conv": (4, ("conv", "norm", "gru")), "gru": (8, ("gru", "out"))} and space.kept == {}
    with torch.no_grad():  # channels 1 and 3 weakest: l1 keeps 0 and 2
        model.conv.weight[1::2] *= 0.01
    pruned = prune_model(model, Policy({"conv": 0.5}, channel_multiple=1), x).eval()
    keep = torch.tensor([0, 2])
    cols = torch.tensor([f * 4 + c for f in range(3) for c in (0, 2)])  # 3 frequency bins after pooling, C = 4
    assert pruned.conv.out_channels == 2 and pruned.norm.normalized_shape == (6, 2)
    assert torch.equal(pruned.norm.weight, model.norm.weight[:, keep])
    assert torch.equal(pruned.gru.weight_ih_l0, model.gru.weight_ih_l0[:, cols])
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (3, 7, 3)
        full = prune_model(model, Policy({"conv": 1.0}, channel_multiple=1), x).eval()
        torch.testing.assert_close(full(x), model(x))


def test_pooling_across_channels_keeps_the_conv_whole():
    """Pooling passed a conv's channels whatever the dim it pooled: a MaxPool1d over the channel dim (channels
    last, pooled in pairs) would have cut the GRU's columns as if each channel were still one. Now the conv is
    kept whole with the pooling layer named, and the GRU is still a group."""

    class PoolChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv1d(1, 4, 3, padding=1), nn.MaxPool1d(2)
            self.gru, self.out = nn.GRU(2, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):  # (batch, time)
            y = self.pool(self.conv(x.unsqueeze(1)).transpose(1, 2))  # (batch, time, 4) pooled to (batch, time, 2)
            return self.out(self.gru(y)[0])

    space = build_space(PoolChannels().eval(), torch.randn(2, 9))
    assert [g.name for g in space.groups] == ["gru"]
    assert "layer 'pool' (MaxPool1d)" in space.kept["conv"], space.kept


def test_attention_scores_written_by_item_assignment_trace_and_the_rest_prunes():
    """fairseq's decoder writes each step's attention weights with ``attn_scores[:, j, :] = ...``: the trace
    refused the whole model ('_ConcreteProxy' object does not support item assignment). The write is now one
    traced operator.setitem; the encoder and the cell, whose features meet in bmm, are kept whole with that line;
    the source embedding prunes, dead columns exactly, and the scores written come out the same."""
    torch.manual_seed(0)
    x = (torch.randint(0, 20, (3, 6)), torch.randint(0, 20, (3, 5)))
    model = P.scores_loop().eval()
    space = build_space(model, x)
    assert {g.name: (g.units, g.layers) for g in space.groups} == {"src_emb": (8, ("src_emb", "encoder"))}
    line = _at("a = torch.softmax(torch.bmm(enc, h.unsqueeze(2))")
    assert line in space.kept["encoder"] and line in space.kept["cell"]
    with torch.no_grad():
        model.src_emb.weight[:, 1::2] = 0
    pruned = prune_model(model, Policy({"src_emb": 0.5}, channel_multiple=1), x).eval()
    assert pruned.src_emb.weight.shape == (20, 4) and pruned.encoder.input_size == 4
    with torch.no_grad():
        for got, want in zip(pruned(*x), model(*x)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
