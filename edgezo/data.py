"""Training data: read records, encode them for a task, batch them, and score them with forward passes only.

Tasks and record fields:
  classify  {"text", "label"}         MeZO-style: each candidate label word scored by its mean log-prob after the
                                      prompt; cross-entropy over candidates
  complete  {"prompt", "completion"}  mean cross-entropy of the completion tokens only (chat template if the
                                      tokenizer has one)
            or {"messages": [...]}    a conversation (OpenAI / TRL / MLX-LM chat files) rendered with the chat
                                      template; mean cross-entropy of its assistant turns' tokens only
  lm        {"text"}                  mean next-token cross-entropy of every token

Every batch is a dict of tensors whose leading dim is rows, so the engine can repeat it slice-major
(rows [0:R] are slice 0, [R:2R] slice 1, ...) and a loss returns one value per slice:
  input_ids      (R, L) long   right-padded
  attention_mask (R, L) long
  target_mask    (R, L) bool   True where token t is scored (predicted from position t-1)
  label          (R,)   long   classify only: gold option index of the row's example
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from edgezo.errors import EdgezoError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS = ("classify", "complete", "lm")
FIELDS = {"classify": ("text", "label"), "complete": ("prompt", "completion"), "lm": ("text",)}
SUPPORTED = (".jsonl", ".csv", ".txt")
CHAT = "messages"  # a complete record may be a conversation: {"messages": [{"role", "content"}, ...]}
ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = "{text}\nAnswer:"
# fp32 logits per lm_head call (32 MiB), or one position of every row if that is more: every row is in
# each call, so a GPU still reads the head's weights once per (rows × a few positions) at least
_LOGIT_ELEMENTS = 1 << 23

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], int], torch.Tensor]


@dataclass
class Example:
    """One encoded example: one row per candidate (classify) or a single row (complete, lm)."""

    rows: list[list[int]]
    targets: list[list[bool]]  # per row: True where the token is scored
    label: int = -1  # classify: gold option index


@dataclass
class TaskData:
    task: str
    train: list[Example]
    eval: list[Example]
    labels: list[str] | None  # classify: label names in order
    label_words: list[str] | None  # classify: verbalization of each label
    pad_id: int = 0


def typed_template(text: str | None) -> str | None:
    """A classify template as typed on a command line, where a line break arrives as the two characters \\n.

    The CLI and the benchmarks both read --template through this, so the same typed text is the same prompt."""
    return None if text is None else text.replace("\\n", "\n")


# ---------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl, .csv or .txt file (one record per non-blank line of a .txt, as {"text": line})."""
    path = Path(path)
    if not path.is_file():
        raise EdgezoError(f"data file {path} not found: check the path")
    ext = path.suffix.lower()
    if ext not in SUPPORTED:
        raise EdgezoError(f"unsupported data file {path.name}: use one of {', '.join(SUPPORTED)}")
    if not path.read_bytes().strip():  # datasets fails on empty files with an unhelpful message
        raise EdgezoError(f"data file {path} is empty: add at least one record")
    if ext == ".jsonl":
        _check_jsonl(path)
    records = _load_with_datasets(path, {".jsonl": "json", ".csv": "csv", ".txt": "text"}[ext])
    if ext == ".txt":  # blank lines separate paragraphs; they are not records
        records = [r for r in records if r["text"].strip()]
    if not records:
        raise EdgezoError(f"data file {path} has no records: add at least one")
    return records


def _check_jsonl(path: Path) -> None:
    # datasets' own messages do not say which line is broken
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise EdgezoError(f"{path.name} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise EdgezoError(f"{path.name} line {n} is not valid JSON ({err.msg} at column {err.colno}): "
                              "fix that line; each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise EdgezoError(f"{path.name} line {n} is not a JSON object: write one {{...}} object per line")
        if CHAT in obj:  # here, before datasets merges the records' types and names no line
            _check_messages(obj[CHAT], f"{path.name} line {n}")


def _record_lines(path: Path) -> list[int]:
    """The line number of each record of a .jsonl file (its non-blank lines)."""
    text = path.read_text(encoding="utf-8-sig")
    return [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _check_messages(messages, where: str) -> None:
    """A conversation: a list of {"role", "content"} messages with text content, at least one assistant
    turn to learn from ("weight": 0 leaves an assistant turn out of the loss, as in OpenAI's format)."""
    fix = "fix or remove that record"
    if not isinstance(messages, list) or not messages:
        raise EdgezoError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects; {fix}")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise EdgezoError(f"{where}: message {i} is not a {{\"role\", \"content\"}} object; {fix}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise EdgezoError(f"{where}: message {i} has no {key!r}; {fix}")
        if m["role"] not in ROLES:
            raise EdgezoError(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise EdgezoError(f"{where}: message {i}'s content is not text ({type(m['content']).__name__}); "
                              "write it as one string")
        if m.get("weight") not in (None, 0, 1):
            raise EdgezoError(f"{where}: message {i} has weight {m['weight']!r}; use 0 (not trained) or 1")
    if not any(m["role"] == "assistant" and m.get("weight") != 0 for m in messages):
        raise EdgezoError(f"{where}: no assistant message to learn from (the loss is on assistant turns only); "
                          "add one or remove that record")


def _load_with_datasets(path: Path, builder: str) -> list[dict]:
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    except Exception as err:  # datasets/pyarrow/pandas raise many types; the user needs the file and the cause
        if "corresponds to no data" in str(err):  # e.g. a csv with only a header
            return []
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdgezoError(f"could not read {path.name} ({cause}): check that it is a well-formed {builder} file "
                          "with the same type in each column") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- encoding


def load_task_data(path: str | Path, tokenizer: PreTrainedTokenizerBase, task: str, *, eval_fraction: float = 0.1,
                   max_length: int = 128, label_words: dict[str, str] | None = None, template: str | None = None,
                   seed: int = 0, eval_path: str | Path | None = None) -> TaskData:
    """Read, validate and encode a task's train and eval examples.

    Eval data come from `eval_path` or else a deterministic `eval_fraction` hold-out (at least one record).
    classify always uses the plain `template` (default "{text}\\nAnswer:") and label words (default " <label>"),
    even for chat models, so scores are comparable with MeZO. `template` only applies to classify.
    """
    if task not in TASKS:
        raise EdgezoError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    records = _checked(read_records(path), task, Path(path))
    if eval_path is not None:
        train, held = records, _checked(read_records(eval_path), task, Path(eval_path))
    else:
        train, held = _split(records, eval_fraction, seed, Path(path).name)
    labels = words = None
    if task == "classify":
        labels = _label_set(records, held, Path(path).name)
        words = _label_words(labels, label_words)
        template = template or DEFAULT_TEMPLATE
        if "{text}" not in template:
            raise EdgezoError(f"template {template!r} has no {{text}} placeholder: put {{text}} where the input goes")
    encode = _encoder(tokenizer, task, max_length, labels, words, template)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return TaskData(task, [encode(r) for r in train], [encode(r) for r in held], labels, words, pad)


def _checked(records: list[dict], task: str, path: Path) -> list[dict]:
    """Records reduced to the task's fields, as strings (csv labels may come back as numbers); a
    conversation (complete) to its messages and where it is, for the encoder's messages."""
    out, name = [], path.name
    lines = _record_lines(path) if path.suffix.lower() == ".jsonl" else []
    for n, rec in enumerate(records, 1):
        where = f"{name} line {lines[n - 1]}" if len(lines) == len(records) else f"record {n} of {name}"
        if task == "complete" and CHAT in rec and rec.get("prompt") is None:  # a conversation, or none at all
            out.append({CHAT: _chat_messages(rec[CHAT], where), "where": where})
            continue
        for field in FIELDS[task]:
            if field not in rec:
                chat = ", or 'messages' (a conversation)" if task == "complete" else ""
                raise EdgezoError(f"{name} has no {field!r} field, which task {task!r} needs: "
                                  f"give every record {' and '.join(map(repr, FIELDS[task]))}{chat}")
        row = {f: str(rec[f]) if f == "label" and isinstance(rec[f], int) else rec[f] for f in FIELDS[task]}
        for field, value in row.items():
            if value is None:
                raise EdgezoError(f"record {n} of {name} has no {field!r}: add it or remove that record")
            if not isinstance(value, str) or not value.strip():
                raise EdgezoError(f"record {n} of {name} has an empty or non-text {field!r} ({value!r}): "
                                  "fix or remove that record")
        out.append(row)
    return out


def _chat_messages(messages, where: str) -> list[dict]:
    """The checked messages, without the keys datasets adds as None to the messages that lack them."""
    if isinstance(messages, list):
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    if messages is None:
        raise EdgezoError(f"{where} has no 'messages' (nor 'prompt' and 'completion'); fix or remove that record")
    _check_messages(messages, where)  # (again: a .csv's messages column holds strings)
    return messages


def _split(records: list[dict], fraction: float, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    if not 0 < fraction < 1:
        raise EdgezoError(f"eval_fraction must be between 0 and 1, got {fraction}: pass e.g. 0.1")
    if len(records) < 2:
        raise EdgezoError(f"{name} has {len(records)} record, too few to hold out eval data: "
                          "add records or pass a separate eval file")
    order = list(range(len(records)))
    random.Random(f"edgezo-eval:{seed}").shuffle(order)
    n_eval = min(max(1, round(fraction * len(records))), len(records) - 1)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _label_set(records: list[dict], held: list[dict], name: str) -> list[str]:
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise EdgezoError(f"classify needs at least 2 distinct labels in {name}, found {labels}: "
                          "add examples of the other labels")
    unknown = sorted({r["label"] for r in held} - set(labels))
    if unknown:
        raise EdgezoError(f"eval label(s) {unknown} are not among the training labels {labels}: "
                          "fix those labels or add training examples of them")
    return labels


def _label_words(labels: list[str], mapping: dict[str, str] | None) -> list[str]:
    if mapping is None:
        return [" " + label for label in labels]
    missing = [label for label in labels if label not in mapping]
    if missing:
        raise EdgezoError(f"label_words has no word for label(s) {missing}: add them to the mapping")
    return [mapping[label] for label in labels]


def _encoder(tok, task: str, max_length: int, labels, words, template) -> Callable[..., Example]:
    def encode(rec: dict) -> Example:
        if task == "classify":
            prompt = template.replace("{text}", rec["text"])  # not str.format: texts may hold braces
            split = [_split_ids(tok, prompt, w, True) for w in words]
            options = [s[: max_length - 1] for _, s in split]
            p = _fit_prompt(tok, split[0][0], max_length - max(map(len, options)))  # same context for all options
            return Example([p + o for o in options], [[False] * len(p) + [True] * len(o) for o in options],
                           labels.index(rec["label"]))
        if task == "complete" and CHAT in rec:
            return _encode_chat(tok, rec[CHAT], max_length, rec["where"])
        if task == "complete":
            p, c = _encode_completion(tok, rec["prompt"], rec["completion"])
            c = c[: max_length - 1]
            p = _fit_prompt(tok, p, max_length - len(c))
            return Example([p + c], [[False] * len(p) + [True] * len(c)])
        ids = _ids(tok, rec["text"], True)[: max_length - 1] + _eos(tok)  # lm keeps the start
        return Example([ids], [[False] + [True] * (len(ids) - 1)])

    return encode


def _ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _split_ids(tok, prefix: str, suffix: str, special: bool) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids), the suffix tokenized jointly with the prefix (as the model sees the text)
    when that leaves the prefix's tokens intact, else on its own."""
    p, full = _ids(tok, prefix, special), _ids(tok, prefix + suffix, special)
    s = full[len(p):] if full[: len(p)] == p and len(full) > len(p) else _ids(tok, suffix, False)
    return p, s


def _fit_prompt(tok, p: list[int], room: int) -> list[int]:
    """Truncate the prompt from the left, so the scored tokens after it survive; keep a leading BOS."""
    if len(p) <= room:
        return p
    if p[0] == tok.bos_token_id and room > 1:
        return p[:1] + p[len(p) - room + 1:]
    return p[len(p) - room:]


def _encode_completion(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    if tok.chat_template is not None:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p, c = _split_ids(tok, text, completion, False)
    else:  # plain text: a space separates prompt and completion unless the data already has whitespace there
        sep = "" if prompt[-1].isspace() or completion[0].isspace() else " "
        p, c = _split_ids(tok, prompt, sep + completion, True)
    return p, c + _eos(tok)  # the eos teaches the model to stop


def _encode_chat(tok, messages: list[dict], max_length: int, where: str) -> Example:
    """A conversation as one row, its trained assistant turns the scored tokens (their header, e.g.
    "<|im_start|>assistant\\n", is not: it is the prompt of the answer)."""
    if tok.chat_template is None:
        raise EdgezoError(f"{where} is a conversation ('messages'), but this model's tokenizer has no chat template "
                          "to render it: use a chat (instruct) model, or write prompt/completion records")
    text, spans = _chat_spans(tok, messages, where)
    ids, scored = _tokens_in_spans(tok, text, spans)
    ids, scored = _fit_chat(tok, ids, scored, max_length)
    if not any(scored[1:]):  # (token 0 is never predicted)
        raise EdgezoError(f"{where}: no assistant tokens left to learn from within max_length {max_length}: "
                          "raise --max-length or shorten that conversation")
    return Example([ids], [scored])


def _chat_spans(tok, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns: each is what the
    turn adds to the rendering of the turns before it, followed by the assistant header."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(upto: int, header: bool) -> str:
        try:
            return tok.apply_chat_template(plain[:upto], tokenize=False, add_generation_prompt=header)
        except Exception as err:  # jinja raises what a template asks for, e.g. roles that must alternate
            raise EdgezoError(f"{where}: the chat template rejects this conversation ({err}); "
                              "fix or remove that record") from None

    text, spans = render(len(plain), False), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight") == 0:
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise EdgezoError(f"{where}: this model's chat template renders earlier turns differently once later "
                              "turns follow, so the assistant turns cannot be located; train on one-turn "
                              "conversations or prompt/completion records")
        spans.append((len(before), len(through)))
    return text, spans


def _tokens_in_spans(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """(ids of the text, whether each token starts inside a span): from the tokenizer's character offsets
    (the text tokenized as a whole, as the model sees it), or a slow tokenizer's pieces between span edges."""
    inside = lambda at: any(s <= at < e for s, e in spans)  # noqa: E731
    if tok.is_fast:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [inside(start) for start, _ in enc["offset_mapping"]]
    cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
    ids, scored = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = _ids(tok, text[a:b], False)
        ids, scored = ids + piece, scored + [inside(a)] * len(piece)
    return ids, scored


def _fit_chat(tok, ids: list[int], scored: list[bool], max_length: int) -> tuple[list[int], list[bool]]:
    """A conversation longer than max_length loses its end; if its first trained token lies beyond
    max_length, the context before it is cut from the left instead (as complete cuts a prompt), keeping
    max_length // 2 tokens from that turn on."""
    if len(ids) <= max_length:
        return ids, scored
    first = scored.index(True) if any(scored) else 0
    if first < max_length:
        return ids[:max_length], scored[:max_length]
    keep = max_length // 2
    head = _fit_prompt(tok, ids[:first], max_length - keep)
    return head + ids[first: first + keep], [False] * len(head) + scored[first: first + keep]


# ---------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of the examples in order (classify: C consecutive rows per example)."""
    rows = [r for ex in examples for r in ex.rows]
    targets = [t for ex in examples for t in ex.targets]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        tmask[i, : len(t)] = torch.tensor(t)
    batch = {"input_ids": ids, "attention_mask": attn, "target_mask": tmask}
    if examples[0].label >= 0:
        batch["label"] = torch.tensor([ex.label for ex in examples for _ in ex.rows])
    return batch


def batch_at(data: TaskData, batch_size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """The batch of `step`, from (seed, step) alone: sample i = step*batch_size + j is position i % n of
    epoch i // n's permutation, so every epoch visits each example once and a resumed run sees the same data."""
    n = len(data.train)
    samples = range(step * batch_size, (step + 1) * batch_size)
    picks = [data.train[_permutation(seed, i // n, n)[i % n]] for i in samples]
    return collate(picks, data.pad_id)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"edgezo-batches:{seed}:{epoch}").shuffle(order)  # str seeds hash the same everywhere
    return order


def batches(data: TaskData, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Infinite stream of batch_at(data, batch_size, seed, step) for step = start_step, start_step+1, ..."""
    step = start_step
    while True:
        yield batch_at(data, batch_size, seed, step)
        step += 1


# ---------------------------------------------------------------- scoring


def _token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log-probs of the scored tokens, their count), in fp32.

    Runs the base transformer on all positions but the LM head only on the scored ones, gathered into a
    (rows, K, hidden) block: rows stay the leading dim so a per-slice perturbation of lm_head still applies.
    Assumes the causal LM's head is just get_output_embeddings() (true of Llama, OPT, Qwen2, SmolLM2).
    """
    ids = batch["input_ids"]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1]  # position t predicts token t+1
    mask = batch["target_mask"][:, 1:]
    counts = mask.sum(1)
    k = int(counts.max())
    pos = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]  # scored positions first, in order
    valid = torch.arange(k, device=ids.device) < counts[:, None]
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    target = ids[:, 1:].gather(1, pos)
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or model.config.vocab_size
    chunk = max(1, _LOGIT_ELEMENTS // (ids.shape[0] * vocab))
    def logprobs(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return _chunk_logprobs(_head(head, hc).float(), tc)

    if torch.is_grad_enabled() and h.requires_grad:  # backprop (fo-lora): no chunk's logits kept, each recomputed
        logprobs = functools.partial(checkpoint, logprobs, use_reentrant=False)
    logp = torch.cat([logprobs(hc, tc) for hc, tc in zip(h.split(chunk, 1), target.split(chunk, 1))], dim=1)
    return (logp * valid).sum(1), counts


def _head(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """head(h) for a (rows, K, hidden) block as ONE 2-D matmul: a non-contiguous 3-D input would run as a
    batched matrix-vector product that rereads the head's weights once per row (50x slower on a GPU).
    Flattening keeps the rows slice-major, so a per-slice perturbation of the head still applies."""
    return head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)


def _chunk_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target) from a chunk of fp32 logits that nothing else holds. Without autograd the
    normalizer is computed in place, so the chunk is the loss's only logits-sized tensor
    (logsumexp would add two temporaries of its size)."""
    picked = logits.gather(-1, target[..., None]).squeeze(-1)
    if logits.requires_grad:
        return picked - logits.logsumexp(-1)
    top = logits.amax(-1, keepdim=True)
    return picked - (logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1))


def _class_scores(model, batch, num_slices: int, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (S, B, C) = mean log-prob of each label word, gold (S, B))."""
    sums, counts = _token_logprobs(model, batch)
    scores = (sums / counts).view(num_slices, -1, num_labels)
    return scores, batch["label"].view(num_slices, -1, num_labels)[..., 0]


def _class_loss(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """(S,) mean cross-entropy of softmax over the candidates' scores against the gold index."""
    return F.cross_entropy(scores.flatten(0, 1), gold.flatten(), reduction="none").view(gold.shape).mean(1)


def make_loss(data: TaskData) -> LossFn:
    """loss(model, batch, num_slices) -> (num_slices,) fp32 mean loss of each slice's examples.

    classify: cross-entropy of softmax(scores) against the gold label. complete/lm: each example's token-mean
    cross-entropy, averaged over the slice's examples (so long and short examples weigh the same).
    """
    if data.task == "classify":
        num_labels = len(data.labels)
        return lambda model, batch, num_slices: _class_loss(*_class_scores(model, batch, num_slices, num_labels))

    def token_loss(model, batch, num_slices):
        sums, counts = _token_logprobs(model, batch)
        return (-sums / counts).view(num_slices, -1).mean(1)

    return token_loss


def evaluate(model: torch.nn.Module, data: TaskData, batch_size: int = 16) -> dict[str, float]:
    """{"eval_loss"} (and {"eval_accuracy"} for classify) over data.eval, with the training loss code."""
    loss_fn, total, correct = make_loss(data), 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():  # not inference_mode: quanto int4 kernels bump version counters
        for start in range(0, len(data.eval), batch_size):
            chunk = data.eval[start: start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, data.pad_id).items()}
            if data.task == "classify":  # one forward gives both the loss and the accuracy
                scores, gold = _class_scores(model, batch, 1, len(data.labels))
                loss = _class_loss(scores, gold)
                correct += int((scores.argmax(-1) == gold).sum())
            else:
                loss = loss_fn(model, batch, 1)
            total += float(loss[0]) * len(chunk)
    out = {"eval_loss": total / len(data.eval)}
    if data.task == "classify":
        out["eval_accuracy"] = correct / len(data.eval)
    return out
