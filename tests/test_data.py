"""edgezo.data (reading, encoding, batching, slice-wise losses) and the demo data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from edgezo import data as D
from edgezo.errors import EdgezoError
from edgezo.runtime.synthetic import make_model, make_tokenizer

CLASSIFY = [
    {"text": "i love this movie it was great", "label": "positive"},
    {"text": "i hate waiting it was terrible", "label": "negative"},
    {"text": "the quick brown fox", "label": "neutral"},
    {"text": "my name is ada", "label": "positive"},
    {"text": "the lazy dog, terrible", "label": "negative"},
    {"text": "yes true 1 2 3", "label": "neutral"},
    {"text": "i live in lisbon", "label": "positive"},
    {"text": "no false!", "label": "negative"},
]
COMPLETE = [
    {"prompt": "what is my name?", "completion": "your name is ada."},
    {"prompt": "where do i live?", "completion": "you live in lisbon."},
    {"prompt": "question: the fox?", "completion": "quick and brown"},
    {"prompt": "what do i love?", "completion": "this movie, it was great"},
    {"prompt": "what do i hate?", "completion": "waiting"},
]
LM_LINES = ["the quick brown fox jumps", "", "my name is ada", "i love this movie", "  ",
            "i hate waiting", "positive negative neutral", "0 1 2 3 4", "question answer", "user assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model("llama", vocab_size=len(tok))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return path


def load(tmp_path, tok, task, records=None, name=None, **kw):
    if task == "lm":
        path = tmp_path / (name or "lm.txt")
        path.write_text("\n".join(LM_LINES) + "\n")
    else:
        default = CLASSIFY if task == "classify" else COMPLETE
        path = write_jsonl(tmp_path / (name or f"{task}.jsonl"), records or default)
    return D.load_task_data(path, tok, task, **kw)


def repeat(batch, n):
    return {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in batch.items()}


def loss_of(data, model, batch, slices=1):
    with torch.inference_mode():
        return D.make_loss(data)(model, batch, slices)


def naive_token_logprobs(model, ids: list[int], scored: list[bool]) -> torch.Tensor:
    """Log-probs of the scored tokens from full logits of the unpadded sequence."""
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(1, len(ids)) if scored[t]])


# ---------------------------------------------------------------- tasks


def test_classify_batch_layout(tmp_path, tok):
    data = load(tmp_path, tok, "classify", eval_fraction=0.25)
    assert data.labels == ["negative", "neutral", "positive"]
    assert data.label_words == [" negative", " neutral", " positive"]
    assert (len(data.train), len(data.eval)) == (6, 2)
    batch = D.batch_at(data, 4, seed=0, step=0)
    rows = 4 * 3
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == rows
    assert batch["target_mask"].dtype == torch.bool and batch["label"].shape == (rows,)
    # each example's C rows share the prompt, differ in the label word, and carry the same gold index
    ex = data.train[0]
    assert len(ex.rows) == 3 and ex.rows[0][: ex.targets[0].index(True)] == ex.rows[1][: ex.targets[1].index(True)]
    assert tok.decode([t for t, m in zip(ex.rows[2], ex.targets[2]) if m]) == " positive"
    assert tok.decode(ex.rows[0]).endswith("\nAnswer: negative")
    assert batch["label"].view(4, 3).unique(dim=1).shape[1] == 1


@pytest.mark.parametrize("task", D.TASKS)
def test_slices_of_repeated_batch_are_identical(tmp_path, tok, model, task):
    data = load(tmp_path, tok, task)
    batch = D.batch_at(data, 3, seed=1, step=0)
    one = loss_of(data, model, batch)
    three = loss_of(data, model, repeat(batch, 3), 3)
    assert one.shape == (1,) and three.shape == (3,) and three.dtype == torch.float32
    assert torch.allclose(three, one.expand(3), atol=1e-6)


def test_slice_losses_are_not_mixed(tmp_path, tok, model):
    data = load(tmp_path, tok, "complete")
    a, b = D.batch_at(data, 2, 0, 0), D.batch_at(data, 2, 0, 1)
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pad = {k: (lambda v: torch.nn.functional.pad(v, (0, width - v.shape[1]))) for k in a}
    both = {k: torch.cat([pad[k](a[k]), pad[k](b[k])]) for k in a}
    two = loss_of(data, model, both, 2)
    assert torch.allclose(two, torch.cat([loss_of(data, model, a), loss_of(data, model, b)]), atol=1e-6)


def test_classify_matches_naive_full_logits(tmp_path, tok, model):
    data = load(tmp_path, tok, "classify")
    examples = data.train[:4]
    scores = torch.stack([torch.stack([naive_token_logprobs(model, r, t).mean() for r, t in zip(ex.rows, ex.targets)])
                          for ex in examples])
    gold = torch.tensor([ex.label for ex in examples])
    naive = torch.nn.functional.cross_entropy(scores, gold)
    got = loss_of(data, model, D.collate(examples, data.pad_id))
    assert abs(float(got[0]) - float(naive)) < 1e-5


def test_complete_scores_only_the_completion(tmp_path, tok, model):
    data = load(tmp_path, tok, "complete")
    for ex, rec in zip(data.train + data.eval, COMPLETE):
        (row,), (mask,) = ex.rows, ex.targets
        scored = [t for t, m in zip(row, mask) if m]
        assert scored[-1] == tok.eos_token_id and tok.decode(scored[:-1]).strip() == rec["completion"]
        assert tok.decode(row[: mask.index(True)]).strip() == rec["prompt"]
    examples = data.train
    naive = torch.stack([-naive_token_logprobs(model, ex.rows[0], ex.targets[0]).mean() for ex in examples]).mean()
    got = loss_of(data, model, D.collate(examples, data.pad_id))
    assert abs(float(got[0]) - float(naive)) < 1e-5


def test_lm_head_chunking_does_not_change_the_loss(tmp_path, tok, model, monkeypatch):
    data = load(tmp_path, tok, "lm")
    batch = D.batch_at(data, 4, 0, 0)
    whole = loss_of(data, model, batch)
    monkeypatch.setattr(D, "_LOGIT_ELEMENTS", 1)  # one position per lm_head call
    assert torch.allclose(loss_of(data, model, batch), whole, atol=1e-6)


def test_complete_uses_chat_template(tmp_path, model):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    data = load(tmp_path, tok, "complete", eval_fraction=0.2)
    ex = data.train[0]
    text = tok.decode(ex.rows[0][: ex.targets[0].index(True)])
    assert text.startswith("<s>user: ") and text.endswith("<s>assistant: ")
    assert ex.rows[0][-1] == tok.eos_token_id


def test_lm_txt_skips_blank_lines_and_matches_naive(tmp_path, tok, model):
    data = load(tmp_path, tok, "lm")
    assert len(data.train) + len(data.eval) == 8 and len(data.eval) == 1
    ex = data.train[0]
    assert ex.targets[0] == [False] + [True] * (len(ex.rows[0]) - 1)
    naive = torch.stack([-naive_token_logprobs(model, e.rows[0], e.targets[0]).mean() for e in data.train]).mean()
    assert abs(float(loss_of(data, model, D.collate(data.train, data.pad_id))[0]) - float(naive)) < 1e-5


def test_csv_classify_with_numeric_labels(tmp_path, tok):
    path = write_csv(tmp_path / "d.csv", [{"text": r["text"], "label": i % 2} for i, r in enumerate(CLASSIFY)])
    data = D.load_task_data(path, tok, "classify", label_words={"0": " no", "1": " yes"}, template="Q: {text} A:")
    assert data.labels == ["0", "1"] and data.label_words == [" no", " yes"]
    assert tok.decode(data.train[0].rows[1]).startswith("Q: ") and tok.decode(data.train[0].rows[1]).endswith("A: yes")


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_other_architectures(tmp_path, tok, arch):
    data = load(tmp_path, tok, "classify")
    m = make_model(arch, vocab_size=len(tok))
    batch = D.batch_at(data, 2, 0, 0)
    assert torch.allclose(loss_of(data, m, repeat(batch, 2), 2), loss_of(data, m, batch).expand(2), atol=1e-6)


def test_truncation_keeps_scored_tokens(tmp_path, tok):
    long = [{"prompt": "the quick brown fox jumps over the lazy dog " * 5, "completion": "ada"}] * 3
    data = load(tmp_path, tok, "complete", long, max_length=16)
    row, mask = data.train[0].rows[0], data.train[0].targets[0]
    assert len(row) == 16 and tok.decode([t for t, m in zip(row, mask) if m][:-1]).strip() == "ada"
    longer = [dict(r, text=r["text"] * 10) for r in CLASSIFY]
    cls = load(tmp_path, tok, "classify", longer, max_length=20)
    ex = cls.train[0]
    assert max(map(len, ex.rows)) == 20
    assert tok.decode([t for t, m in zip(ex.rows[0], ex.targets[0]) if m]) == " negative"


# ---------------------------------------------------------------- batching, splits, eval


def test_batch_at_is_deterministic_and_covers_each_epoch(tmp_path, tok):
    data = load(tmp_path, tok, "lm")
    n = len(data.train)  # 7: batches of 3 cross epoch boundaries

    def rows(batch):
        return [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]

    stream = [r for s in range(7) for r in rows(D.batch_at(data, 3, seed=5, step=s))]
    every = {tuple(ex.rows[0]) for ex in data.train}
    assert set(stream[:n]) == every and set(stream[n: 2 * n]) == every and stream[:n] != stream[n: 2 * n]
    again = D.batches(data, 3, seed=5, start_step=4)
    for s in range(4, 7):
        assert all(torch.equal(a, b) for a, b in zip(next(again).values(), D.batch_at(data, 3, 5, s).values()))
    assert stream[:n] != [r for s in range(3) for r in rows(D.batch_at(data, 3, seed=6, step=s))][:n]


def test_eval_split(tmp_path, tok):
    a = load(tmp_path, tok, "classify", seed=3)
    b = load(tmp_path, tok, "classify", seed=3)
    assert a.eval == b.eval and len(a.eval) == 1 and len(a.train) == 7
    path = write_jsonl(tmp_path / "ev.jsonl", CLASSIFY[:3])
    c = load(tmp_path, tok, "classify", eval_path=path)
    assert len(c.train) == 8 and len(c.eval) == 3


def test_evaluate(tmp_path, tok, model):
    data = load(tmp_path, tok, "classify", eval_fraction=0.5)
    out = D.evaluate(model, data, batch_size=3)
    assert set(out) == {"eval_loss", "eval_accuracy"} and 0 <= out["eval_accuracy"] <= 1
    whole = loss_of(data, model, D.collate(data.eval, data.pad_id))
    assert abs(out["eval_loss"] - float(whole[0])) < 1e-5
    assert set(D.evaluate(model, load(tmp_path, tok, "lm"))) == {"eval_loss"}


def test_demo_data_is_a_complete_task(tok):
    path = Path(D.__file__).parent / "demo_data" / "personal.jsonl"
    records = D.read_records(path)
    assert 20 <= len(records) <= 30
    data = D.load_task_data(path, tok, "complete")
    assert len(data.train) + len(data.eval) == len(records)


# ---------------------------------------------------------------- errors


def error(fn, *args, **kw) -> str:
    with pytest.raises(EdgezoError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message and ":" in message  # one line: the problem, then the fix
    return message


def test_file_errors(tmp_path, tok):
    assert "not found" in error(D.read_records, tmp_path / "nope.jsonl")
    (tmp_path / "d.parquet").write_text("x")
    msg = error(D.read_records, tmp_path / "d.parquet")
    assert "unsupported" in msg and ".jsonl" in msg and ".csv" in msg and ".txt" in msg
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "empty" in error(D.read_records, tmp_path / "empty.jsonl")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    assert "empty" in error(D.read_records, tmp_path / "blank.txt")
    (tmp_path / "header.csv").write_text("text,label\n")
    assert "no records" in error(D.read_records, tmp_path / "header.csv")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    assert "line 3" in error(D.read_records, path)
    path.write_text('{"text": "a"}\n["a list"]\n')
    assert "line 2" in error(D.read_records, path) and "object" in error(D.read_records, path)


def test_field_errors(tmp_path, tok):
    msg = error(load, tmp_path, tok, "complete", [{"prompt": "a", "answer": "b"}] * 3)
    assert "'completion'" in msg and "'complete'" in msg
    path = write_csv(tmp_path / "d.csv", [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}])
    msg = error(D.load_task_data, path, tok, "classify")
    assert "'text'" in msg and "'classify'" in msg
    msg = error(load, tmp_path, tok, "classify", CLASSIFY[:2] + [{"text": "  ", "label": "positive"}])
    assert "record 3" in msg and "'text'" in msg
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "ok"}, {"text": 5}, {"text": "b"}])
    msg = error(D.load_task_data, path, tok, "lm")
    assert "record 2 of lm.jsonl" in msg
    msg = error(load, tmp_path, tok, "classify", CLASSIFY[:2] + [{"text": "c"}])
    assert "record 3" in msg and "'label'" in msg


def test_label_errors(tmp_path, tok):
    same = [dict(r, label="positive") for r in CLASSIFY]
    assert "at least 2" in error(load, tmp_path, tok, "classify", same)
    path = write_jsonl(tmp_path / "ev.jsonl", [{"text": "x", "label": "angry"}])
    msg = error(load, tmp_path, tok, "classify", eval_path=path)
    assert "'angry'" in msg and "training labels" in msg
    assert "'neutral'" in error(load, tmp_path, tok, "classify", label_words={"positive": " y", "negative": " n"})
    assert "{text}" in error(load, tmp_path, tok, "classify", template="Review: ")


def test_unknown_task(tmp_path, tok):
    msg = error(load, tmp_path, tok, "summarize", CLASSIFY, name="x.jsonl")
    assert "'summarize'" in msg and "classify" in msg


# ---------------------------------------------------------------- chat records (complete + "messages")

CHAT = [
    {"messages": [{"role": "system", "content": "you are ada's assistant"},
                  {"role": "user", "content": "what is my name?"},
                  {"role": "assistant", "content": "your name is ada."},
                  {"role": "user", "content": "where do i live?"},
                  {"role": "assistant", "content": "you live in lisbon."}]},
    {"messages": [{"role": "user", "content": "what do i love?"}, {"role": "assistant", "content": "this movie"}]},
    {"messages": [{"role": "user", "content": "what do i hate?"}, {"role": "assistant", "content": "waiting"}]},
]


@pytest.fixture(scope="module")
def chat_tok():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def scored_text(tok, ex: D.Example) -> str:
    return tok.decode([i for i, t in zip(ex.rows[0], ex.targets[0]) if t])


def test_chat_records_train_on_every_assistant_turn_only(tmp_path, chat_tok, model):
    data = load(tmp_path, chat_tok, "complete", CHAT, eval_path=write_jsonl(tmp_path / "eval.jsonl", CHAT[:1]),
                max_length=512)
    ex = data.train[0]
    assert chat_tok.decode(ex.rows[0]).startswith("<s>system: you are ada's assistant\n<s>user: what is my name?")
    assert scored_text(chat_tok, ex) == "your name is ada.\nyou live in lisbon.\n"  # (each turn's end too)
    assert [scored_text(chat_tok, e) for e in data.train[1:]] == ["this movie\n", "waiting\n"]
    loss = loss_of(data, model, D.collate(data.train, data.pad_id))
    assert loss.shape == (1,) and torch.isfinite(loss).all()


def test_chat_weight_0_leaves_a_turn_out_and_records_mix_with_prompt_completion(tmp_path, chat_tok):
    first = {"messages": [dict(m, weight=0) if m["content"] == "your name is ada." else m for m in CHAT[0]["messages"]]}
    data = load(tmp_path, chat_tok, "complete", [first, COMPLETE[0], COMPLETE[1]],
                eval_path=write_jsonl(tmp_path / "eval.jsonl", CHAT[1:]), max_length=512)
    assert scored_text(chat_tok, data.train[0]) == "you live in lisbon.\n"
    assert scored_text(chat_tok, data.train[1]) == "your name is ada.</s>"


def test_chat_spans_match_without_offsets(monkeypatch, chat_tok):
    """A slow tokenizer (no character offsets) tokenizes the pieces between turn edges: the same tokens here."""
    rows = {}
    for fast in (True, False):
        monkeypatch.setattr(type(chat_tok), "is_fast", property(lambda self, fast=fast: fast))
        rows[fast] = D._encode_chat(chat_tok, CHAT[0]["messages"], 512, "chat.jsonl line 1")
    assert rows[True] == rows[False] and any(rows[True].targets[0])


def test_chat_truncation_keeps_assistant_tokens(chat_tok):
    long_system = {"role": "system", "content": " ".join(["the quick brown fox jumps over the lazy dog"] * 20)}
    messages = [long_system, *CHAT[0]["messages"][1:]]
    full = D._encode_chat(chat_tok, messages, 4096, "x")
    first = full.targets[0].index(True)
    assert first > 40  # the first answer starts beyond max_length = 40
    ex = D._encode_chat(chat_tok, messages, 40, "x")
    assert len(ex.rows[0]) <= 40 and ex.rows[0][0] == chat_tok.bos_token_id  # the context is cut from the left
    assert scored_text(chat_tok, ex).startswith("your name is")
    whole = D._encode_chat(chat_tok, CHAT[0]["messages"], 4096, "x")
    cut = whole.targets[0].index(True) + 5
    short = D._encode_chat(chat_tok, CHAT[0]["messages"], cut, "x")  # the end is cut, the first answer's start stays
    assert short.rows[0] == whole.rows[0][:cut] and sum(short.targets[0]) == 5


def test_chat_needs_a_chat_template(tmp_path, tok):
    with pytest.raises(EdgezoError, match="chat.jsonl line 1 is a conversation .* no chat template"):
        load(tmp_path, tok, "complete", CHAT, name="chat.jsonl")


@pytest.mark.parametrize("record, words", [
    ({"messages": "hello"}, "line 3: 'messages' must be a non-empty list"),
    ({"messages": []}, "line 3: 'messages' must be a non-empty list"),
    ({"messages": ["hello"]}, "line 3: message 1 is not a"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "line 3: message 1 has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, "line 3: message 1 has no 'content'"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "line 3: message 1 has role 'robot'; use one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]},
     "line 3: message 1's content is not text (int)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 3: no assistant message to learn from"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]},
     "line 3: no assistant message to learn from"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 2}]},
     "line 3: message 2 has weight 2"),
    ({"text": "no conversation"}, "line 3 has no 'messages' (nor 'prompt' and 'completion')"),
])
def test_malformed_chat_records_name_the_line(tmp_path, chat_tok, record, words):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT[0]) + "\n\n" + json.dumps(record) + "\n" + json.dumps(CHAT[1]) + "\n")
    with pytest.raises(EdgezoError, match="chat.jsonl " + words.replace("(", r"\(").replace(")", r"\)")):
        D.load_task_data(path, chat_tok, "complete")


def test_chat_beyond_max_length_is_a_clear_error(tmp_path, chat_tok):
    # the assistant turn adds nothing a template renders before the cut: nothing to learn from
    no_end = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = make_tokenizer()
    tok.chat_template = no_end
    with pytest.raises(EdgezoError, match="line 1: no assistant tokens left to learn from"):
        D._encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], 32,
                       "chat.jsonl line 1")
