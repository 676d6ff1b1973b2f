"""Balanced, disjoint, deterministic splits for the benchmark tasks (sentiment_data.py, news_data.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from edgezo.errors import EdgezoError


def deal(by_label: dict[str, list[str]], labels: tuple[str, ...], sizes: dict[str, int], seed: int,
         tag: str, unit: str, fix: str) -> dict[str, list[dict]]:
    """Each label's texts shuffled once, then dealt in `sizes` order (test first, so it stays the same when
    train grows), an equal share of every label per split; each split shuffled. Returns train/validation/test.
    Too few texts of a label: "only {counts} usable {unit}, {need} needed: {fix}"."""
    need = sum(sizes.values()) // len(labels)
    if min(len(by_label[label]) for label in labels) < need:
        counts = {label: len(v) for label, v in by_label.items()}
        raise EdgezoError(f"only {counts} usable {unit}, {need} needed: {fix}")
    pools = {}
    for label in labels:
        pool = list(by_label[label])
        random.Random(f"edgezo-{tag}:{seed}:{label}").shuffle(pool)
        pools[label] = pool
    splits, start = {}, 0
    for name, n in sizes.items():
        share = n // len(labels)
        split = [{"text": t, "label": label} for label in labels for t in pools[label][start: start + share]]
        random.Random(f"edgezo-{tag}:{seed}:{name}").shuffle(split)
        splits[name] = split
        start += share
    return {name: splits[name] for name in ("train", "validation", "test")}


def write(out_dir: Path, splits: dict[str, list[dict]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
