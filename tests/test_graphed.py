"""ZOConfig.cuda_graph: the update replayed as a CUDA graph is the eager update, step for step."""

import pytest
import torch
from conftest import lm_loss, tiny, token_batch

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim import make_optimizer


def _run(cuda_graph, steps, device, **kw):
    delta = DeltaModel.attach(tiny("opt").to(device))
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=8, k=4, interval=3, cuda_graph=cuda_graph, **kw)
    batch = {k: v.to(device) for k, v in token_batch().items()}
    results = []
    for step in range(steps):
        if step == 5:  # a replayed graph reads the learning rate as it is now
            opt.config.lr /= 2
        results.append(opt.step(lm_loss, batch))
    return delta, opt, results


def test_cuda_graph_off_a_gpu_is_a_clear_error():
    with pytest.raises(EdgezoError, match="cuda_graph needs every trained Linear on a CUDA device"):
        _run(True, 0, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("state_dtype", ["fp32", "fp16"])
def test_graphed_update_equals_eager_through_refreshes(state_dtype):
    # 8 steps: eager warm-up, capture, replays, a refresh at steps 3 and 6 (new tensors: warm-up and capture
    # again), the learning rate halved at step 5
    eager, e_opt, e_res = _run(False, 8, "cuda", state_dtype=state_dtype)
    graphed, g_opt, g_res = _run(True, 8, "cuda", state_dtype=state_dtype)
    assert g_opt.graphed.graph is not None
    assert [r.scalars for r in g_res] == [r.scalars for r in e_res]
    for key, value in eager.state_dict().items():
        assert torch.equal(value, graphed.state_dict()[key]), key
    for key, value in e_opt.state_dict()["tensors"].items():
        assert torch.equal(value, g_opt.state_dict()["tensors"][key]), key
