"""fo-lora: exact gradients through the delta path, block recomputation, exact resume, PEFT export."""

import dataclasses
import json
import sys

import pytest
import torch

from conftest import lm_loss, tiny, token_batch
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter
from edgezo.optim import make_optimizer
from edgezo.runtime.recompute import recomputed_blocks
from edgezo.tune import TuneConfig, tune


def _trained(arch="llama", steps=8, **settings):
    model = tiny(arch)
    delta = DeltaModel.attach(model)
    opt = make_optimizer("fo-lora", delta, seed=0, **{"lr": 1e-2, **settings})
    batch = token_batch()
    losses = [opt.step(lm_loss, batch).loss for _ in range(steps)]
    return model, delta, opt, losses


def test_fo_lora_learns_and_never_writes_the_base(arch):
    before = {k: v.clone() for k, v in tiny(arch).state_dict().items()}
    model, delta, opt, losses = _trained(arch)
    assert losses[-1] < losses[0] - 0.3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(t.lora_B.abs().max() > 0 and not t.lora_B.requires_grad for t in delta.targets)  # published, detached


def test_recomputing_blocks_gives_the_same_gradients():
    model = tiny()
    delta = DeltaModel.attach(model)
    opt = make_optimizer("fo-lora", delta, seed=0)
    grads = []
    for recompute in (False, True):
        a = opt.factors[3][1]  # B: A gets no gradient while B is zero
        with torch.enable_grad():
            a.grad = None
            opt._publish(detached=False)
            with recomputed_blocks(model) if recompute else torch.enable_grad():
                lm_loss(model, token_batch(), 1)[0].backward()
        grads.append(a.grad.clone())
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert all("forward" not in vars(block) for block in model.model.layers)  # and the blocks theirs again


def test_the_delta_path_under_autograd_is_lora_out_of_place():
    torch.manual_seed(0)
    model = tiny()
    target = DeltaModel.attach(model).targets[0]
    a = torch.randn(4, target.in_features, requires_grad=True)
    b = torch.randn(target.out_features, 4, requires_grad=True)
    x = torch.randn(6, target.in_features, requires_grad=True)
    target.lora_A, target.lora_B = a, b
    with torch.enable_grad():
        out = target.module(x)
        out.square().sum().backward()
    got = [t.grad.clone() for t in (a, b, x)]
    for t in (a, b, x):
        t.grad = None
    with torch.enable_grad():
        reference = torch.nn.functional.linear(x, target.module.weight, target.module.bias) + (x @ a.T) @ b.T
        reference.square().sum().backward()
    assert torch.allclose(out, reference, atol=1e-5) and "CopySlices" not in out.grad_fn.name()
    assert all(torch.allclose(g, t.grad, atol=1e-4, rtol=1e-4) for g, t in zip(got, (a, b, x)))


def test_a_step_counts_four_forwards_with_recompute_three_without():
    assert _trained(steps=1)[2].step(lm_loss, token_batch()).forwards == 4
    assert _trained(steps=1, recompute=False)[2].step(lm_loss, token_batch()).forwards == 3


def test_state_dict_round_trip_continues_bitwise():
    _, _, reference, _ = _trained(steps=6)
    _, delta, opt, _ = _trained(steps=3)
    saved = {"step": opt.state.step, "seed": 0, "tensors": {k: v.clone() for k, v in opt.state_dict()["tensors"].items()}}
    _, _, fresh, _ = _trained(steps=0)
    fresh.load_state_dict(saved)
    for _ in range(3):
        fresh.step(lm_loss, token_batch())
    ours, theirs = fresh.state_dict()["tensors"], reference.state_dict()["tensors"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_peft_applies_the_exported_pair(tmp_path):
    from peft import PeftModel

    model, delta, _, _ = _trained()
    ids = token_batch()["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_adapter(delta, tmp_path, "base")
    delta.detach()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(model, tmp_path).eval()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_fo_lora_refuses_what_it_cannot_do():
    delta = DeltaModel.attach(tiny())
    with pytest.raises(EdgezoError, match="one process"):
        make_optimizer("fo-lora", delta, parallel=object())
    with pytest.raises(EdgezoError, match="unknown setting"):
        make_optimizer("fo-lora", delta, n_probes=4)


def test_tune_with_fo_lora_resumes_to_the_same_adapter(tmp_path):
    from edgezo.runtime.synthetic import save_model_dir

    folder = save_model_dir(tmp_path / "llama", "llama")
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"my name is ada and i live in lisbon {i}" for i in range(20)) + "\n")
    cfg = dict(task="lm", optimizer="fo-lora", batch_size=4, max_length=24, eval_every=3, checkpoint_every=3,
               optim={"lr": 1e-2})
    whole = tune(folder, data, tmp_path / "whole", TuneConfig(steps=6, **cfg))
    tune(folder, data, tmp_path / "split", TuneConfig(steps=3, **cfg))
    tune(folder, data, tmp_path / "split", TuneConfig(steps=6, **cfg), resume=True)
    evals = [r["eval_loss"] for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert whole.forwards == 6 * 4 and evals[-1] < evals[0] - 0.2
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "split" / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()


def test_auto_takes_fo_lora_where_it_fits_and_keeps_its_choice_on_resume(tmp_path, monkeypatch):
    import edgezo.tune
    from edgezo.runtime.synthetic import save_model_dir

    folder = save_model_dir(tmp_path / "llama", "llama")
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"my name is ada and i live in lisbon {i}" for i in range(20)) + "\n")
    cfg = dict(task="lm", optimizer="auto", batch_size=4, max_length=24, eval_every=0, checkpoint_every=2)
    pins = []
    monkeypatch.setattr(edgezo.tune, "pin_heap_threshold", lambda: pins.append(True) or True)  # (it would stay)
    tune(folder, data, tmp_path / "roomy", TuneConfig(steps=2, **cfg))
    assert json.loads((tmp_path / "roomy" / "run.json").read_text())["settings"]["optimizer"] == "fo-lora"
    assert pins == []
    monkeypatch.setattr(edgezo.tune, "usable_bytes", lambda device: 1 << 20)  # 1 MiB free: nothing first-order fits
    tune(folder, data, tmp_path / "roomy", TuneConfig(steps=3, **cfg), resume=True)  # the run keeps its method
    assert json.loads((tmp_path / "roomy" / "run.json").read_text())["settings"]["optimizer"] == "fo-lora"
    assert pins == [True]  # with its heap pinned, the smallest it can be
    tune(folder, data, tmp_path / "tight", TuneConfig(steps=1, **cfg))
    assert json.loads((tmp_path / "tight" / "run.json").read_text())["settings"]["optimizer"] == "zo-mopi"
    with pytest.raises(EdgezoError, match="name the optimizer"):
        tune(folder, data, tmp_path / "lr", TuneConfig(steps=1, **{**cfg, "optim": {"lr": 1e-3}}))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only glibc's heap is pinned")
def test_auto_pins_the_heap_when_fo_lora_fits_only_so(tmp_path, monkeypatch):
    import edgezo.tune
    from edgezo.plan import Settings, plan
    from edgezo.runtime.synthetic import save_model_dir

    folder = save_model_dir(tmp_path / "llama", "llama")
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"my name is ada and i live in lisbon {i}" for i in range(20)) + "\n")
    fo = Settings("fo-lora", batch_size=4, seq_len=24, loss="scored")
    unpinned, pinned = (plan(folder, dataclasses.replace(fo, pin_heap=pin)).peak_bytes for pin in (False, True))
    pins = []
    monkeypatch.setattr(edgezo.tune, "pin_heap_threshold", lambda: pins.append(True) or True)  # (it would stay)
    monkeypatch.setattr(edgezo.tune, "usable_bytes", lambda device: (unpinned + pinned) / 2 / 0.9)
    cfg = TuneConfig(task="lm", optimizer="auto", batch_size=4, max_length=24, eval_every=0, steps=1)
    tune(folder, data, tmp_path / "run", cfg)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["optimizer"] == "fo-lora"
    assert pins == [True]
    monkeypatch.setattr(edgezo.tune, "usable_bytes", lambda device: unpinned / 0.9)
    tune(folder, data, tmp_path / "roomy", cfg)
    assert pins == [True]  # the faster unpinned heap where it fits
    monkeypatch.setattr(edgezo.tune, "pin_heap_threshold", lambda: False)  # not glibc
    with pytest.raises(EdgezoError, match="pin_heap needs glibc"):
        tune(folder, data, tmp_path / "musl", dataclasses.replace(cfg, optimizer="fo-lora", pin_heap=True))
    from edgezo.runtime.load import load_model

    on_gpu = dataclasses.replace(load_model(folder), device=torch.device("cuda"))  # (checked before it is used)
    with pytest.raises(EdgezoError, match="pin_heap pins the CPU heap; the model is on cuda: turn it off"):
        tune(on_gpu, data, tmp_path / "gpu", dataclasses.replace(cfg, optimizer="fo-lora", pin_heap=True))
    assert not (tmp_path / "gpu").exists()
