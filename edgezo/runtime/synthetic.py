"""Random-init models and a locally trained tokenizer, for tests and benchmarks (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PreTrainedTokenizerFast, Qwen2Config

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "my name is ada and i live in lisbon",
    "i love this movie it was great",
    "i hate waiting it was terrible",
    "positive negative neutral yes no true false",
    "question answer user assistant system",
    "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) - \n",
]

# Shapes of the real models whose time and memory the benchmarks reproduce (values are random).
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),  # SmolLM2-135M's shape (vocab 49152, tied head)
    "llama-350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32),
}


def make_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on a fixed corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(arch: str = "llama", vocab_size: int = 512, seed: int = 0, **shape) -> torch.nn.Module:
    """A random-init causal LM of the given architecture (`llama`, `opt`, `qwen2`) and shape overrides."""
    torch.manual_seed(seed)
    dims = {**SHAPES["tiny"], **shape}
    if arch in ("llama", "qwen2"):
        dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False, **dims)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True, **dims)
    elif arch == "opt":
        d = dict(dims)
        ffn = d.pop("ffn_dim", d.pop("intermediate_size", 4 * d["hidden_size"]))
        d.pop("intermediate_size", None)
        cfg = OPTConfig(
            vocab_size=vocab_size, max_position_embeddings=512, ffn_dim=ffn, word_embed_proj_dim=d["hidden_size"],
            hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], dropout=0.0, attention_dropout=0.0,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def save_model_dir(path: Path, arch: str = "llama", **shape) -> Path:
    """Write a random-init model and the local tokenizer as a Hugging Face folder (safetensors)."""
    tok = make_tokenizer()
    model = make_model(arch, vocab_size=len(tok), **shape)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return Path(path)
