"""The 1-D switch (train_1d): biases and norms as fp32 deltas beside their modules, probed in full space."""

import copy

import pytest
import torch
from conftest import lm_loss, tiny, token_batch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from edgezo.checkpoint import load_checkpoint, save_checkpoint
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter, load_adapter, merge_adapter
from edgezo.optim import ZO_OPTIMIZERS as OPTIMIZERS, make_optimizer  # (fo-lora trains no 1-D deltas)
from edgezo.runtime.synthetic import save_model_dir
from edgezo.zo import estimators

SETTINGS = {"zo-mopi": dict(rank=8, k=4), "zo-muon": dict(rank=8), "lozo": dict(rank=2), "mezo": {}}


def _run(name, model, steps, seed=0, batch=None, **kw):
    delta = DeltaModel.attach(model)
    opt = make_optimizer(name, delta, seed=seed, **{**SETTINGS[name], **kw})
    batch = batch or token_batch()
    return delta, opt, [opt.step(lm_loss, batch) for _ in range(steps)]


def _dense_copy(base, delta, with_1d=True):
    """A copy of the untouched `base` (taken before attaching: no hooks) whose weights, biases and
    norm scales hold base + delta, written in place."""
    dense = copy.deepcopy(base)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for t in delta.targets:
            modules[t.name].weight += t.weight_delta()
        for v in delta.vectors if with_1d else []:
            for param, d in v.params():
                getattr(modules[v.name], param).add_(d)
    return dense


# -- off by default --------------------------------------------------------------------------------
def test_default_off_adds_nothing(arch):
    batch = token_batch()
    d_default, o_default, r_default = _run("zo-mopi", tiny(arch), 3, batch=batch, interval=2)
    d_off, _, r_off = _run("zo-mopi", tiny(arch), 3, batch=batch, interval=2, train_1d=False)
    assert not o_default.config.train_1d and d_default.vectors == []
    assert not any(k.endswith("_1d") for k in d_default.state_dict())
    hooked = {name for name, m in d_default.model.named_modules() if m._forward_hooks}
    assert hooked == {t.name for t in d_default.targets}  # no hook on any norm or bias
    assert [r.scalars for r in r_default] == [r.scalars for r in r_off]
    default, off = d_default.state_dict(), d_off.state_dict()
    assert default.keys() == off.keys() and all(torch.equal(v, off[k]) for k, v in default.items())


def test_which_parameters(arch):
    delta, _, _ = _run("zo-muon", tiny(arch), 0, train_1d=True)
    names = {v.name: v.kind for v in delta.vectors}
    assert all(".layers." in n for n in names)  # embeddings, final norm and head stay out
    if arch == "opt":  # every target Linear has a bias; two LayerNorms per block
        assert sum(k == "linear" for k in names.values()) == len(delta.targets)
        assert sum(k == "layernorm" for k in names.values()) == 4
    else:  # Llama: no biases, two RMSNorms per block
        assert set(names.values()) == {"rmsnorm"} and len(names) == 4


# -- on: exact delta path ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zo-mopi", "mezo"])
def test_trained_1d_deltas_equal_a_dense_in_place_update(name, arch):
    model = tiny(arch)
    base = copy.deepcopy(model)
    batch = token_batch()
    lr = {"lr": 1e-3} if name == "mezo" else {}
    delta, _, _ = _run(name, model, 5, batch=batch, train_1d=True, lr_1d=1e-2, **lr)
    assert delta.vectors and all(d.abs().max() > 0 for v in delta.vectors for _, d in v.params())
    for key, value in model.state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key  # the base is only read
    with torch.no_grad():
        ours, ref = model(**batch).logits, _dense_copy(base, delta)(**batch).logits
        plain = _dense_copy(base, delta, with_1d=False)(**batch).logits  # the 1-D part must matter
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    assert ((ours - plain).norm() / plain.norm()).item() > 1e-4


# -- probes: g_i is the directional derivative, the update regenerates the same z -----------------
class Parallel(nn.Module):
    """A Linear with bias, a LayerNorm and an RMSNorm side by side: the loss below is linear in all."""

    def __init__(self, m=6, n=5):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n, m), nn.LayerNorm(m), LlamaRMSNorm(m, eps=1e-6)])
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()

    def forward(self, x, h):
        return torch.cat([self.layers[0](x), self.layers[1](h), self.layers[2](h)], dim=-1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_probe_scalars_are_directional_derivatives_with_1d(name):
    torch.manual_seed(0)
    model = Parallel().double()
    rows, n_probes = 7, 4
    batch = {"x": torch.randn(rows, 5, dtype=torch.float64), "h": torch.randn(rows, 6, dtype=torch.float64)}
    c = torch.randn(rows, 18, dtype=torch.float64)

    def loss(mod, b, s):
        return (mod(b["x"], b["h"]) * c.repeat(s, 1)).view(s, rows, -1).sum(dim=(1, 2))

    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(loss(model, batch, 1).sum(),
                                                                         list(model.parameters()))))
    delta = DeltaModel.attach(model, pattern="layers")
    two_sided = name in ("mezo", "lozo")
    opt = make_optimizer(name, delta, seed=3, n_probes=n_probes, two_sided=two_sided, train_1d=True,
                         lr_1d=0.5, **({} if name == "mezo" else {"rank": 3}))
    opt.config.lr = 0.0  # the Linear stays put (make_optimizer refuses lr = 0, a run that trains nothing)
    assert [(v.name, v.kind) for v in delta.vectors] == [
        ("layers.0", "linear"), ("layers.1", "layernorm"), ("layers.2", "rmsnorm")]
    losses = opt.evaluate(loss, batch, estimators.slices(n_probes, two_sided), t=0)
    g, _ = estimators.probe_scalars(losses, n_probes, two_sided, opt.config.eps)
    target, seed = delta.targets[0], opt.step_seed(0)
    blocks = {(v.name, p): v.probe_block(p, seed, n_probes).double() for v in delta.vectors for p, _ in v.params()}
    for i in range(n_probes):
        expected = (grads["layers.0.weight"] * target.probe_direction(target.probe(seed, n_probes, i, "cpu"))).sum()
        expected += sum((grads[f"{name}.{p}"] * z[i]).sum() for (name, p), z in blocks.items())
        assert g[i].item() == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    # the update: δ = −lr_1d · (1/N) Σ g_i z_i with the regenerated blocks
    opt.apply_update(g, 0)
    for v in delta.vectors:
        for p, d in v.params():
            expected = -0.5 * (g.double()[:, None] * blocks[(v.name, p)]).mean(0)
            torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-7)


def test_1d_probes_never_share_a_stream_with_2d_probes():
    delta, opt, _ = _run("zo-muon", tiny("opt"), 0, train_1d=True, n_probes=2)
    seed = opt.step_seed(0)
    vector, target = delta.vectors[0], delta.targets[0]
    z1, z2 = vector.probe_block("bias", seed, 2), target.probe(seed, 2, 0, target.device).flatten()
    k = min(z1.shape[1], z2.numel())
    assert not torch.allclose(z1[0, :k], z2[:k])
    assert not torch.equal(vector.probe_block("bias", seed, 2), vector.probe_block("bias", opt.step_seed(1), 2))


# -- fused == separate, save -> load -> continue ------------------------------------------------
@pytest.mark.parametrize("name", ["zo-mopi", "mezo"])
def test_fused_probes_equal_separate_forwards_with_1d(name, arch):
    batch = token_batch()
    runs = [_run(name, tiny(arch), 4, fuse=fuse, batch=batch, train_1d=True, lr_1d=1e-2,
                 **({} if name == "mezo" else {"interval": 2})) for fuse in (None, 1)]
    (d1, _, r1), (d2, _, r2) = runs
    for a, b in zip(r1, r2):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert torch.allclose(torch.tensor(a.scalars), torch.tensor(b.scalars), rtol=1e-3, atol=1e-3)
    s1, s2 = d1.state_dict(), d2.state_dict()
    assert any(k.endswith("_1d") for k in s1)
    for key, value in s1.items():
        assert torch.allclose(value, s2[key], rtol=1e-4, atol=1e-6), key


def test_checkpoint_then_continue_is_bitwise(arch, tmp_path):
    batch, kw = token_batch(), dict(interval=3, train_1d=True, lr_1d=1e-2)
    d_full, o_full, _ = _run("zo-mopi", tiny(arch), 6, batch=batch, **kw)
    d_a, o_a, _ = _run("zo-mopi", tiny(arch), 4, batch=batch, **kw)
    save_checkpoint(tmp_path, d_a, o_a, {})
    d_b, o_b, _ = _run("zo-mopi", tiny(arch), 0, batch=batch, **kw)
    load_checkpoint(tmp_path, d_b, o_b)
    for _ in range(2):
        o_b.step(lm_loss, batch)
    full = d_full.state_dict()
    assert full.keys() == d_b.state_dict().keys() and any(k.endswith("_1d") for k in full)
    for key, value in d_b.state_dict().items():
        assert torch.equal(value, full[key]), key
    with pytest.raises(EdgezoError, match="train_1d"):  # a 1-D checkpoint into a run without the switch
        d_c, o_c, _ = _run("zo-mopi", tiny(arch), 0, batch=batch, interval=3)
        load_checkpoint(tmp_path, d_c, o_c)


def test_no_matching_1d_parameter_is_an_error():
    model = nn.Sequential()
    model.layers = nn.ModuleList([nn.Linear(4, 4, bias=False)])
    with pytest.raises(EdgezoError, match="no bias or norm"):
        make_optimizer("zo-muon", DeltaModel.attach(model, pattern="layers"), rank=2, train_1d=True)


# -- export: PEFT loads the biases and norms and reproduces the logits -----------------------------
@pytest.mark.parametrize("arch_name", ["opt", "llama"])
def test_peft_loads_1d_deltas_with_the_same_logits(arch_name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgezo.runtime.load import load_model

    folder = save_model_dir(tmp_path / arch_name, arch_name)
    loaded = load_model(folder)
    delta = DeltaModel.attach(loaded.model)
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=8, k=4, interval=3, lr=5e-2, train_1d=True, lr_1d=5e-2)
    ids = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(7):
        opt.step(lm_loss, {"input_ids": ids})
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits
        saved = {k: v.clone() for k, v in delta.state_dict().items() if k.endswith("_1d")}
        for v in delta.vectors:
            for _, d in v.params():
                d.zero_()
        only_2d = loaded.model(input_ids=ids).logits
        delta.load_state_dict({**delta.state_dict(), **saved})
        base = AutoModelForCausalLM.from_pretrained(folder).eval()
        plain = base(input_ids=ids).logits
    assert (ours - only_2d).abs().max() > 1e-4  # the 1-D deltas matter, so the check below sees them
    export_adapter(delta, tmp_path / "adapter", folder)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-4
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)

    # edgezo's own loader (eval / generate --adapter) and the merged export reproduce them too
    fresh = load_model(folder)
    reloaded = DeltaModel.attach(fresh.model)
    load_adapter(reloaded, tmp_path / "adapter")
    assert {v.name for v in reloaded.vectors} == {v.name for v in delta.vectors}
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "adapter", tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(fresh.model(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)


# -- settings: profiles and the planner ----------------------------------------------------------
def test_profile_fixed_train_1d_reaches_the_optimizer_and_the_plan(tmp_path):
    from edgezo import profiles
    from edgezo.plan import Settings, plan
    from edgezo.runtime.synthetic import make_model

    config = make_model("opt", vocab_size=97).config
    assert "train_1d" not in Settings().optimizer_kwargs()  # off: the settings of earlier runs are unchanged
    assert Settings(train_1d=True).optimizer_kwargs()["train_1d"] is True
    off, on = plan(config, Settings()), plan(config, Settings(train_1d=True))
    assert on.items["optimizer_state"] > off.items["optimizer_state"]
    toml = (profiles._profile_dir() / "ci-2core.toml").read_text() + "\n[fixed]\ntrain_1d = true\n"
    (tmp_path / "p.toml").write_text(toml)
    settings, _, _ = profiles.resolve(profiles.load_profile(str(tmp_path / "p.toml")), config)
    assert settings.train_1d and settings.optimizer_kwargs()["train_1d"]
