"""metrics.jsonl (one JSON object per logged step or evaluation) and curves.png."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss and eval metrics against forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return None
    metric = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_loss"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["forwards"] for r in train], [r["loss"] for r in train], lw=1)
    ax1.set(xlabel="forward passes", ylabel="train loss", title="training loss")
    if evals:
        ax2.plot([r["forwards"] for r in evals], [r[metric] for r in evals], marker="o")
    ax2.set(xlabel="forward passes", ylabel=metric.replace("_", " "), title="held-out " + metric.split("_")[1])
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
