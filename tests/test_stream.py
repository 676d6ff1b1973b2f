"""Layer streaming: the same numbers as the resident model, blocks back on meta after each forward, less memory."""

from pathlib import Path

import pytest
import torch
from conftest import lm_loss, token_batch
from safetensors import safe_open
from safetensors.torch import save_file

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim import make_optimizer
from edgezo.runtime.load import load_model
from edgezo.runtime.memory import peak_rss_of_child
from edgezo.runtime.stream import SafetensorsReader, load_streaming
from edgezo.runtime.synthetic import make_model, make_tokenizer, save_model_dir

BLOCKS = 3  # a first, a middle and a last block for the prefetch chain


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {arch: save_model_dir(root / arch, arch, num_hidden_layers=BLOCKS) for arch in ("llama", "opt")}


def _blocks_on_meta(streamed) -> bool:
    return all(t.is_meta for t in streamed.streamer.blocks.parameters())


def _zo_losses(model, batch, steps=3, **kw):
    delta = DeltaModel.attach(model)
    opt = make_optimizer("zo-mopi", delta, rank=8, k=4, n_probes=4, two_sided=True, **kw)  # 8 slices, one forward
    results = [opt.step(lm_loss, batch) for _ in range(steps)]
    assert all(r.forwards == 8 for r in results)
    return [r.loss for r in results], delta


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_streamed_forward_and_zo_steps_match_resident(folders, arch, device):
    resident, streamed = load_model(folders[arch], device=device).model, load_streaming(folders[arch], device=device)
    batch = {k: v.to(device) for k, v in token_batch().items()}
    with torch.inference_mode():
        torch.testing.assert_close(streamed.model(**batch).logits, resident(**batch).logits, rtol=0, atol=1e-5)
    assert _blocks_on_meta(streamed)
    stats = streamed.streamer.stats
    assert (stats.blocks_loaded, stats.prefetch_hits) == (BLOCKS, BLOCKS - 1)

    block_file_bytes = stats.bytes_read
    expected, resident_delta = _zo_losses(resident, batch)
    losses, streamed_delta = _zo_losses(streamed.model, batch)  # hooks sit on the streamed Linears
    assert losses == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # the steps moved the delta
    for key, value in resident_delta.state_dict().items():
        torch.testing.assert_close(streamed_delta.state_dict()[key], value, rtol=0, atol=1e-5)
    assert stats.bytes_read == 4 * block_file_bytes  # fused probes: each block read once per step
    assert _blocks_on_meta(streamed)
    assert all(t.device.type == device for t in streamed_delta.targets)  # where the streamed blocks compute
    if device == "cuda":  # streamed weights and the state in host memory: the GPU holds two blocks' worth
        streamed_delta.detach()
        offloaded, _ = _zo_losses(streamed.model, batch, offload_state=True)
        assert offloaded == losses


def test_sharded_checkpoint_without_prefetch(tmp_path):
    make_model("llama", vocab_size=len(make_tokenizer()), num_hidden_layers=BLOCKS).save_pretrained(
        tmp_path, max_shard_size="200KB")
    make_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    resident, streamed = load_model(tmp_path).model, load_streaming(tmp_path, prefetch=False)
    batch = token_batch()
    with torch.inference_mode():
        torch.testing.assert_close(streamed.model(**batch).logits, resident(**batch).logits, rtol=0, atol=1e-5)
    assert streamed.streamer.stats.prefetch_hits == 0 and _blocks_on_meta(streamed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_matches_resident(folders, precision):
    resident = load_model(folders["llama"], precision).model
    streamed = load_streaming(folders["llama"], precision)
    batch = token_batch()
    with torch.inference_mode():
        out = streamed.model(**batch).logits
        assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        torch.testing.assert_close(out, resident(**batch).logits)


def test_blocks_return_to_meta_when_a_forward_raises(folders):
    streamed = load_streaming(folders["llama"], wrap=True)
    batch = token_batch()
    with torch.inference_mode():
        reference = streamed.model(**batch).logits
        handle = streamed.streamer.blocks[1].mlp.register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            streamed.model(**batch)
        assert _blocks_on_meta(streamed)
        handle.remove()
        torch.testing.assert_close(streamed.model(**batch).logits, reference, rtol=0, atol=0)
    streamed.streamer.detach()
    assert _blocks_on_meta(streamed)


def test_quantized_streaming_is_rejected(folders):
    with pytest.raises(EdgezoError, match="fp32, fp16 or bf16"):
        load_streaming(folders["llama"], "bnb-int8")


def test_reader_matches_safetensors(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).view(2, 3), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    reader, keys = SafetensorsReader(tmp_path), list(tensors)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for key, got in zip(keys, reader.read(keys)):
            assert got.dtype == f.get_tensor(key).dtype and torch.equal(got, f.get_tensor(key))
        for key, got in zip(keys, reader.read(keys, torch.float16)):
            want = f.get_tensor(key)
            assert torch.equal(got, want.half() if want.is_floating_point() else want)


def _forward_peak(folder, streamed: bool) -> int:
    """In a fresh process: load, run one small forward; the growth of the kernel's RSS high-water mark.

    VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's RSS (Linux carries the
    forked copy's high-water mark over exec), which would hide everything below the pytest process's size.
    """
    start = _reset_peak()
    loaded = load_streaming(folder) if streamed else load_model(folder)
    with torch.inference_mode():
        loaded.model(input_ids=torch.ones(1, 16, dtype=torch.long))
    return _vm_hwm() - start


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _vm_hwm()


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_peak_memory_is_below_resident(tmp_path):
    """Exact peaks in fresh processes; bench/stream_memory.py measures the full-size ratio."""
    shape = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6)
    folder = save_model_dir(tmp_path / "m", "llama", **shape)
    entries = SafetensorsReader(folder).entries
    block_bytes = sum(e.end - e.start for name, e in entries.items() if ".layers." in name)
    resident, _ = peak_rss_of_child(_forward_peak, folder, False)
    streamed, _ = peak_rss_of_child(_forward_peak, folder, True)
    assert resident > block_bytes  # the resident model touches all its weights
    # 12 blocks of ~7 MB: streaming holds two at a time, so it must save well over half of them
    assert resident - streamed > 0.5 * block_bytes, (resident, streamed, block_bytes)
