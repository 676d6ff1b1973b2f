"""The delta path over quantized bases (bitsandbytes int8/nf4, quanto int8/int4) on the CPU."""

import pytest
import torch
from conftest import lm_loss

from edgezo.delta import DeltaModel
from edgezo.optim import make_optimizer
from edgezo.runtime.load import load_model
from edgezo.runtime.synthetic import save_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("q") / "llama", "llama")


def _raw_state(model):
    """Every tensor the base holds in memory (quantized data, scales, ...), as raw bytes.

    Read from the modules directly: bitsandbytes' state_dict() itself rewrites the CPU-packed layout.
    """
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name, p in list(tensors.items()):
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors[name + ".absmax"] = state.absmax
    return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in tensors.items() if v.numel()}


@pytest.mark.parametrize("precision", ["bnb-int8", "bnb-nf4", "quanto-int8", "quanto-int4"])
def test_delta_path_trains_over_quantized_base_without_writing_it(tiny_dir, precision):
    torch.set_num_threads(1)
    loaded = load_model(tiny_dir, precision=precision)
    ids = torch.randint(4, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    with torch.no_grad():  # bitsandbytes' CPU nf4 path repacks weight and absmax on its first forward
        loaded.model(**batch)
    before = _raw_state(loaded.model)
    delta = DeltaModel.attach(loaded.model)
    assert len(delta.targets) == 14  # every decoder Linear of the 2-block model, quantized or not
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=8, k=4, lr=2e-2, interval=10)
    with torch.no_grad():
        start = lm_loss(loaded.model, batch, 1).item()
    for _ in range(20):
        opt.step(lm_loss, batch)
    with torch.no_grad():
        end = lm_loss(loaded.model, batch, 1).item()
    assert end < start, f"{precision}: loss {start:.4f} -> {end:.4f}"
    after = _raw_state(loaded.model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{precision}: base tensor {key} was written"
