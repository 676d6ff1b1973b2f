"""The 1-D delta path: fp32 deltas of biases and norm scales beside their modules (`train_1d`).

Like the 2-D delta path the module is only read; a forward hook adds the delta to its output:
  - a Linear with bias b:         y + δb
  - a LayerNorm (weight w, bias b): y + δw ⊙ x̂ + δb,  x̂ = layer_norm(x) without affine
  - an RMSNorm (Llama, Qwen2, …):  y + δw ⊙ x̂,       x̂ = x · rsqrt(mean(x²) + eps), as the module computes it
This is exact because a norm's output is linear in its weight and bias. While probing, slice s
of the stacked batch uses δ + scale_s · z_s instead of δ, with z drawn per parameter and step as
one (N, d) block. The update is plain ZO-SGD in the full space of each vector, whatever the
method: δ ← δ − lr_1d · (1/N) Σ_i g_i z_i (spec §10.1 #1: biases and norms get full-space
Gaussian probes and a learning rate of their own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgezo.errors import EdgezoError
from edgezo.zo.probes import PROBE_1D, derive_seed, gaussian
from edgezo.zo.probing import Probing


Kind = Literal["linear", "layernorm", "rmsnorm"]
PARAMS = ("weight", "bias")
# Seed keys of 1-D parameters start here, far above any 2-D target index (and PROBE_1D is a
# purpose of its own), so no 1-D draw can share a stream with a 2-D probe.
INDEX_OFFSET = 1 << 40


def _params_of(kind: Kind) -> tuple[str, ...]:
    return ("bias",) if kind == "linear" else PARAMS  # a Linear's weight is 2-D: the delta path's


def norm_kind(module: nn.Module) -> Kind | None:
    """The kind of a norm whose 1-D scale (and bias) can be trained ("layernorm", "rmsnorm"), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    is_rms = type(module).__name__.endswith("RMSNorm")
    if is_rms and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")):
        return "rmsnorm"
    return None


@dataclass
class VectorDelta:
    """The fp32 deltas of one module's 1-D parameters (the module itself is only read)."""

    index: int  # the seed key of the module's weight is INDEX_OFFSET + 2·index, of its bias + 1
    name: str
    module: nn.Module
    kind: Kind
    device: torch.device
    weight: torch.Tensor | None = None  # δ of a norm's scale
    bias: torch.Tensor | None = None  # δ of a Linear's or LayerNorm's bias

    def params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, its delta) for the parameters this module trains."""
        for param in PARAMS:
            value = getattr(self, param)
            if value is not None:
                yield param, value

    def probe_block(self, param: str, step_seed: int, n_probes: int) -> torch.Tensor:
        """The step's N fp32 probes of one parameter, (N, d): the same numbers in forward and update."""
        seed = derive_seed(step_seed, INDEX_OFFSET + 2 * self.index + PARAMS.index(param), 0, PROBE_1D)
        return gaussian((n_probes, getattr(self, param).numel()), seed, self.device)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂: the norm's input normalized as the module does it, without its weight and bias."""
        if self.kind == "layernorm":
            return F.layer_norm(x, self.module.normalized_shape, None, None, self.module.eps)
        eps = getattr(self.module, "variance_epsilon", getattr(self.module, "eps", None))
        eps = torch.finfo(x.dtype).eps if eps is None else eps  # torch.nn.RMSNorm's eps=None
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def per_slice(self, param: str, probing: Probing | None) -> torch.Tensor:
        """The delta each slice sees, (S, d): δ + scale_s · z_s while probing, else δ as (1, d)."""
        delta = getattr(self, param)
        if probing is None or not probing.wanted:  # (every slice unperturbed: nothing to draw)
            return delta[None]
        block = self.probe_block(param, probing.step_seed, probing.n_probes)
        return probing.perturbed(delta, [(0, block)], torch.float32)

    def forward_delta(self, x: torch.Tensor, output: torch.Tensor, probing: Probing | None) -> torch.Tensor:
        """The module's output plus its 1-D delta (rows grouped slice-major while probing)."""
        n = 1 if probing is None else len(probing.scales)
        d, dtype = output.shape[-1], output.dtype
        out = output.reshape(n, -1, d)
        if self.weight is not None:
            w = self.per_slice("weight", probing).to(output.device, dtype)
            out = out + w[:, None, :] * self.normalized(x).reshape(n, -1, d).to(dtype)
        if self.bias is not None:
            out = out + self.per_slice("bias", probing).to(output.device, dtype)[:, None, :]
        return out.reshape(output.shape)

    def update(self, g: torch.Tensor, step_seed: int, lr: float) -> None:
        """δ ← δ − lr · (1/N) Σ_i g_i z_i for each parameter, from the regenerated probes."""
        g = (g.float() / len(g)).to(self.device)
        for param, delta in self.params():
            delta -= lr * torch.tensordot(g, self.probe_block(param, step_seed, len(g)), dims=1)

    def base(self, param: str) -> torch.Tensor:
        """The module's own parameter (only read)."""
        return getattr(self.module, param)


def find_vectors(model: nn.Module, pattern: str, linears: list[nn.Module]) -> list[VectorDelta]:
    """Zero deltas for the biases of `linears` and the norms whose names match `pattern`, in module order."""
    regex, wanted = re.compile(pattern), {id(m) for m in linears}
    out: list[VectorDelta] = []
    for name, module in model.named_modules():
        if id(module) in wanted:
            kind = "linear" if getattr(module, "bias", None) is not None else None
        else:
            kind = norm_kind(module) if regex.search(name) else None
        if kind is None:
            continue
        v = VectorDelta(len(out), name, module, kind, _home(module))
        for param in _params_of(kind):
            if getattr(module, param, None) is not None:
                setattr(v, param, torch.zeros(getattr(module, param).numel(), device=v.device))
        out.append(v)
    return out


def _home(module: nn.Module) -> torch.device:
    """Where the deltas live: the device of the module's 1-D parameters (the CPU for a streamed, meta one)."""
    device = (module.bias if getattr(module, "bias", None) is not None else module.weight).device
    return torch.device("cpu") if device.type == "meta" else device


# -- state and PEFT form ---------------------------------------------------------------------------
def state_dict(vectors: list[VectorDelta]) -> dict[str, torch.Tensor]:
    """Every delta, keyed `<module>.weight_1d` / `<module>.bias_1d` (beside the 2-D keys of DeltaModel)."""
    return {f"{v.name}.{param}_1d": delta for v in vectors for param, delta in v.params()}


def load_state_dict(vectors: list[VectorDelta], state: dict[str, torch.Tensor]) -> None:
    """Set every delta from `state`; a state and a model that disagree about 1-D deltas are an error."""
    expected = state_dict(vectors)
    given = {k for k in state if k.endswith(("weight_1d", "bias_1d"))}
    if given != set(expected):
        raise EdgezoError(f"the saved state has {len(given)} 1-D deltas but the model expects {len(expected)}; "
                          "load it with the train_1d setting it was saved with")
    for v in vectors:
        for param, _ in v.params():
            setattr(v, param, state[f"{v.name}.{param}_1d"].to(v.device).clone())


def peft_key(v: VectorDelta, param: str) -> str:
    """Where PEFT keeps the parameter: a LoRA layer's bias (bias="lora_only") or a modules_to_save norm."""
    where = f"{v.name}.base_layer.bias" if v.kind == "linear" else f"{v.name}.{param}"
    return f"base_model.model.{where}"


def to_peft(vectors: list[VectorDelta]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config entries): the trained values base + δ, in the form PEFT loads.

    PEFT stores whole parameters, not deltas: LoRA targets' biases with bias="lora_only", and
    norms as modules_to_save (PeftModel.from_pretrained copies them into the wrapped modules).
    """
    tensors = {peft_key(v, p): (v.base(p).detach().float() + d.to(v.base(p).device)).contiguous().cpu()
               for v in vectors for p, d in v.params()}
    norms = sorted(v.name for v in vectors if v.kind != "linear")
    config = {"bias": "lora_only" if any(v.kind == "linear" for v in vectors) else "none",
              "modules_to_save": norms or None}
    return tensors, config


def from_peft(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict) -> list[VectorDelta]:
    """The deltas (saved − base) of an adapter written by `to_peft`; empty when it holds none."""
    out: list[VectorDelta] = []
    norms = set(config.get("modules_to_save") or [])
    for name, module in model.named_modules():
        if name in norms:  # an entry that is no norm (e.g. lm_head) is not a 1-D delta
            kind = norm_kind(module)
        else:
            kind = "linear" if f"base_model.model.{name}.base_layer.bias" in tensors else None
        if kind is None:
            continue
        v = VectorDelta(len(out), name, module, kind, _home(module))
        for param in _params_of(kind):
            key = peft_key(v, param)
            if key in tensors and getattr(module, param, None) is not None:
                setattr(v, param, tensors[key].float().to(v.device) - v.base(param).detach().float())
        if any(True for _ in v.params()):
            out.append(v)
    return out
