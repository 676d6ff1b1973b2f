"""edgezo: fine-tune a causal LM on its own device with forward passes only.

    import edgezo
    loaded = edgezo.load_model("SmolLM2.gguf", precision="bnb-nf4")
    result = edgezo.tune(loaded, "my_notes.jsonl", task="complete", out="runs/me")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `import edgezo` stays light.
_API = {
    "load_model": "edgezo.runtime.load",
    "LoadedModel": "edgezo.runtime.load",
    "DeltaModel": "edgezo.delta",
    "make_optimizer": "edgezo.optim",
    "EdgezoError": "edgezo.errors",
    "tune": "edgezo.tune",
    "TuneConfig": "edgezo.tune",
    "plan": "edgezo.plan",
    "export_adapter": "edgezo.export",
    "merge_adapter": "edgezo.export",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgezo' has no attribute {name!r}")


__all__ = sorted(_API)
