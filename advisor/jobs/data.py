"""Examples -> token ids and labels -> packed (or padded) training sequences.

Why labels matter: the loss is taken on what the model should *produce* (assistant messages with
weight 1, completions), never on the prompt, exactly as OpenAI's fine-tuning does. Every example is
built as a list of pieces (token ids, trained?) so the label mask is exact, whatever the template.

Two renderings:
- ``template``: the tokenizer's chat template. Each message's text is the difference between the
  conversation rendered with and without it, and an assistant message is split at the generation
  prompt, so the role header stays untrained;
- ``plain`` (for models without a template, and for prompt/completion): ``User: ...`` /
  ``Assistant: ...`` lines, the BOS token first and the EOS token after every trained answer.

Packing concatenates examples and cuts sequences of ``seq_len``; every packed block keeps each token's
example index (``segments``), from which the trainer builds a block-diagonal causal mask and position ids
restarting at every example: a token never attends to another example (a plain causal mask over a packed
block would, under SDPA). An example cut at a block's end goes on, as its own segment, in the next block.
The label of a segment's first token is dropped too (``loss_labels``): it would be predicted from the
previous example's last token, a loss term across the boundary.
A batch is right-padded to its longest sequence with labels -100; unpacked batches need no attention mask
(in a causal model a real token never attends to a later pad). ``advisor.jobs.train.Collator`` turns
these into tensors for transformers' Trainer (the job's ``data_collator``).

Only a tokenizer object is needed (any ``transformers`` tokenizer); no torch here (the training process,
``advisor.jobs.train``, is the jobs' one torch edge).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from advisor.jobs.files import CHAT, COMPLETION

IGNORE = -100
NUM_TOKENS = "num_tokens"  # train.Collator(count_tokens=True): a batch's tokens without its padding
ROLE_LABEL = {"system": "System", "user": "User", "assistant": "Assistant"}


class DataError(ValueError):
    """An example that cannot be turned into training tokens (the job fails with code `data`)."""


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    labels: list[int]
    segments: list[int] | None = None  # packed blocks: each token's example index within the block

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def loss_tokens(self) -> int:
        """Tokens the next-token loss is taken on: trained labels after the first position (the shift), none
        at a packed segment's start (``loss_labels``)."""
        return sum(1 for x in loss_labels(self)[1:] if x != IGNORE)


def loss_labels(seq: Tokens) -> list[int]:
    """`seq`'s labels with the first token of every packed segment but the first ignored: its next-token
    target would be predicted from the previous example's last token (a loss across the boundary)."""
    if seq.segments is None:
        return list(seq.labels)
    segs = seq.segments
    return [IGNORE if i and segs[i] != segs[i - 1] else x for i, x in enumerate(seq.labels)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _plain_pieces(tokenizer: Any, example: dict[str, Any], fmt: str) -> list[tuple[list[int], bool]]:
    pieces: list[tuple[list[int], bool]] = []
    if tokenizer.bos_token_id is not None:
        pieces.append(([tokenizer.bos_token_id], False))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == COMPLETION:
        pieces.append((_encode(tokenizer, example["prompt"]), False))
        pieces.append((_encode(tokenizer, example["completion"]) + eos, True))
        return pieces
    for m in example["messages"]:
        label = ROLE_LABEL[m["role"]]
        if m["role"] == "assistant":
            pieces.append((_encode(tokenizer, f"{label}: "), False))
            pieces.append((_encode(tokenizer, m["content"]) + eos, m.get("weight", 1) == 1))
            pieces.append((_encode(tokenizer, "\n"), False))
        else:
            pieces.append((_encode(tokenizer, f"{label}: {m['content']}\n"), False))
    return pieces


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _template_pieces(tokenizer: Any, example: dict[str, Any]) -> list[tuple[list[int], bool]]:
    msgs = example["messages"]
    pieces: list[tuple[list[int], bool]] = []
    prev = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = _render(tokenizer, msgs[:i], True)
            if not head.startswith(prev):
                raise DataError("the chat template does not render conversations as growing prefixes")
            pieces.append((_encode(tokenizer, head[len(prev) :]), False))
            prev = head
        cur = _render(tokenizer, msgs[: i + 1], False)
        if not cur.startswith(prev):
            raise DataError("the chat template does not render conversations as growing prefixes")
        trained = m["role"] == "assistant" and m.get("weight", 1) == 1
        pieces.append((_encode(tokenizer, cur[len(prev) :]), trained))
        prev = cur
    return pieces


def encode_example(tokenizer: Any, example: dict[str, Any], fmt: str, chat_format: str = "auto") -> Tokens:
    """One example as ids and labels (labels = ids where trained, -100 elsewhere)."""
    use_template = fmt == CHAT and (
        chat_format == "template" or (chat_format == "auto" and getattr(tokenizer, "chat_template", None))
    )
    if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_format 'template' but the tokenizer has no chat template")
    pieces = _template_pieces(tokenizer, example) if use_template else _plain_pieces(tokenizer, example, fmt)
    ids: list[int] = []
    labels: list[int] = []
    for toks, trained in pieces:
        ids.extend(toks)
        labels.extend(toks if trained else [IGNORE] * len(toks))
    return Tokens(ids, labels)


def encode_all(
    tokenizer: Any, examples: Iterable[tuple[int, dict[str, Any]]], fmt: str, chat_format: str = "auto"
) -> list[Tokens]:
    out = []
    for line, ex in examples:
        try:
            seq = encode_example(tokenizer, ex, fmt, chat_format)
        except DataError as exc:
            raise DataError(f"line {line}: {exc}") from exc
        if seq.trained_tokens == 0:
            raise DataError(f"line {line}: no trained tokens after tokenisation")
        out.append(seq)
    return out


def pack(seqs: Sequence[Tokens], seq_len: int) -> list[Tokens]:
    """Concatenate and cut into `seq_len` blocks (the tail block is shorter: `pad_batch` pads it);
    blocks that train on nothing (all prompt) are dropped."""
    ids: list[int] = []
    labels: list[int] = []
    segs: list[int] = []
    for n, s in enumerate(seqs):
        ids.extend(s.ids)
        labels.extend(s.labels)
        segs.extend([n] * len(s.ids))
    out = []
    for i in range(0, len(ids), seq_len):
        block = Tokens(ids[i : i + seq_len], labels[i : i + seq_len], segs[i : i + seq_len])
        if block.trained_tokens:
            out.append(block)
    return out


def pad_segments(seqs: Sequence[Tokens]) -> tuple[list[list[int]], list[list[int]]]:
    """Segment ids (padding -1; an unpacked sequence is one segment) and position ids restarting at 0 at
    every segment, right-padded like `pad_batch`."""
    width = max(len(s.ids) for s in seqs)
    segs_out, pos_out = [], []
    for s in seqs:
        segs = list(s.segments) if s.segments is not None else [0] * len(s.ids)
        pos, prev, at = [], None, 0
        for g in segs:
            at = 0 if g != prev else at + 1
            pos.append(at)
            prev = g
        segs_out.append(segs + [-1] * (width - len(segs)))
        pos_out.append(pos + [0] * (width - len(pos)))
    return segs_out, pos_out


def truncate(seqs: Sequence[Tokens], seq_len: int) -> tuple[list[Tokens], int]:
    """Unpacked training: each example cut to `seq_len`; returns the kept ones and how many were cut."""
    out, cut = [], 0
    for s in seqs:
        if len(s.ids) > seq_len:
            cut += 1
            s = Tokens(s.ids[:seq_len], s.labels[:seq_len])
        if s.trained_tokens:
            out.append(s)
    return out, cut


def pad_batch(seqs: Sequence[Tokens], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad a batch to its longest sequence."""
    width = max(len(s.ids) for s in seqs)
    ids = [s.ids + [pad_id] * (width - len(s.ids)) for s in seqs]
    labels = [s.labels + [IGNORE] * (width - len(s.labels)) for s in seqs]
    return ids, labels


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled indices of one epoch in batches of exactly `batch_size`: the last batch wraps around to
    the start, so every process of a distributed job runs the same number of steps."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    steps = -(-n // batch_size)
    flat = [order[i % n] for i in range(steps * batch_size)]
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
