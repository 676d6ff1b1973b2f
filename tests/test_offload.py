"""ZOConfig.offload_state: state kept in host memory trains exactly as state kept on the device.

On CPU the "device" copies are real copies too (offload.visit always copies), so a write-back that
went missing would lose the update and fail these tests; on a CUDA machine the same tests run against
the GPU, with pinned host memory and asynchronous copies.
"""

import pytest
import torch
from conftest import lm_loss, tiny, token_batch

from edgezo.checkpoint import load_checkpoint, save_checkpoint
from edgezo.delta import FACTORS, DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter
from edgezo.optim import make_optimizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(offload, steps, device, optimizer="zo-mopi", **kw):
    torch.manual_seed(0)
    delta = DeltaModel.attach(tiny("opt").to(device))
    small = {"zo-mopi": dict(rank=8, k=4), "zo-muon": dict(rank=8), "lozo": dict(rank=4), "mezo": {}}[optimizer]
    opt = make_optimizer(optimizer, delta, seed=0, interval=3, offload_state=offload, **small, **kw)
    batch = {k: v.to(device) for k, v in token_batch().items()}
    return delta, opt, [opt.step(lm_loss, batch) for _ in range(steps)]


def _assert_same(a_delta, a_opt, b_delta, b_opt):
    for key, value in a_delta.state_dict().items():
        assert torch.equal(value.cpu(), b_delta.state_dict()[key].cpu()), key
    for key, value in a_opt.state_dict()["tensors"].items():
        assert torch.equal(value.cpu(), b_opt.state_dict()["tensors"][key].cpu()), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer,kw", [("zo-mopi", {}), ("zo-mopi", {"state_dtype": "bf16"}),
                                          ("zo-mopi", {"train_1d": True}),  # (1-D deltas stay on the device)
                                          ("zo-muon", {}), ("lozo", {}), ("mezo", {})])
def test_offloaded_state_trains_exactly_as_resident_state(device, optimizer, kw):
    # 7 steps: refreshes (a fold into the adapter, a new basis) at steps 3 and 6
    resident, r_opt, r_res = _run(False, 7, device, optimizer, **kw)
    offloaded, o_opt, o_res = _run(True, 7, device, optimizer, **kw)
    assert [r.scalars for r in o_res] == [r.scalars for r in r_res]
    _assert_same(resident, r_opt, offloaded, o_opt)
    target, state = offloaded.targets[0], o_opt.state.per_target[0]
    assert target.offloaded and (optimizer == "mezo" or target.lora_B is not None)  # folded (MeZO never folds)
    assert all(getattr(target, k).device.type == "cpu" for k in FACTORS if getattr(target, k) is not None)
    assert all(v.device.type == "cpu" for v in state.values())
    if device == "cuda":
        assert target.coords().is_pinned() and all(v.is_pinned() for v in state.values())


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_run_resumes_from_a_checkpoint_and_exports_the_same_adapter(device, tmp_path):
    straight, s_opt, _ = _run(True, 5, device)
    delta, opt, _ = _run(True, 2, device)
    save_checkpoint(tmp_path, delta, opt, {})
    delta, opt, _ = _run(True, 0, device)
    load_checkpoint(tmp_path, delta, opt)
    assert delta.targets[0].right.device.type == "cpu" and opt.state.per_target[0]["v"].device.type == "cpu"
    batch = {k: v.to(device) for k, v in token_batch().items()}
    for _ in range(3):
        opt.step(lm_loss, batch)
    _assert_same(straight, s_opt, delta, opt)
    resident, _, _ = _run(False, 5, device)
    export_adapter(delta, tmp_path / "offloaded", "base")
    export_adapter(resident, tmp_path / "resident", "base")
    assert (tmp_path / "offloaded/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "resident/adapter_model.safetensors").read_bytes()


def test_offload_state_with_cuda_graph_is_a_clear_error():
    with pytest.raises(EdgezoError, match="cuda_graph and offload_state don't combine"):
        _run(True, 0, "cpu", cuda_graph=True)


def test_an_update_chunk_moves_to_the_device_and_back_in_one_copy():
    from edgezo import offload

    delta, opt, _ = _run(True, 4, "cpu")  # (a refresh at step 3 packs the tensors anew)
    chunks = opt._update_chunks()
    assert set(opt.packed) == {tuple(chunk) for chunk in chunks}  # every chunk takes the packed path
    chunk = chunks[0]
    assert len(chunk) > 1
    host = opt.packed[tuple(chunk)]  # coordinates, momentum and V of the chunk, stacked
    assert torch.equal(host["coords"][1], opt.targets[chunk[1]].right)
    assert torch.equal(host["momentum"][1], opt.state.per_target[chunk[1]]["momentum"])
    copies = offload.visit(host, torch.device("cpu"))
    assert len({v.untyped_storage().data_ptr() for v in copies.values()}) == 1
    for value in copies.values():
        value.add_(1)
    back = offload.write_back(host, copies)
    assert all(back[k] is host[k] and torch.equal(host[k], copies[k]) for k in host)  # in place, all of it
    assert torch.equal(host["coords"][1], opt.targets[chunk[1]].right)  # the targets' own tensors are views
    # a decoder block's bases and adapters (made by the refresh's folds) share a buffer too
    block = [delta.targets[i] for i in delta.blocks[0]]
    assert len(block) > 1 and all(t.lora_A is not None for t in block)
    assert len({getattr(t, k).untyped_storage().data_ptr() for t in block for k in ("left", "lora_A", "lora_B")}) == 1
