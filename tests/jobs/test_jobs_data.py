"""Examples -> tokens: the loss mask covers exactly what the model should produce, in both renderings."""

from __future__ import annotations

from pathlib import Path

import pytest

from advisor.jobs import data as D

pytestmark = pytest.mark.needs_torch
CHAT = {
    "messages": [
        {"role": "system", "content": "you count"},
        {"role": "user", "content": "count from 3"},
        {"role": "assistant", "content": "4 5"},
        {"role": "user", "content": "count from 7"},
        {"role": "assistant", "content": "8 9", "weight": 0},
        {"role": "user", "content": "count from 1"},
        {"role": "assistant", "content": "2 3"},
    ]
}


@pytest.fixture(scope="module")
def tok(tiny_root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_root / "model"))


def _trained(tok, seq: D.Tokens) -> list[str]:
    return tok.convert_ids_to_tokens([i for i, lab in zip(seq.ids, seq.labels, strict=True) if lab != D.IGNORE])


def test_template_rendering_trains_on_weighted_assistant_answers_only(tok) -> None:
    seq = D.encode_example(tok, CHAT, "chat")
    assert _trained(tok, seq) == ["4", "5", "</s>", "2", "3", "</s>"]  # not the weight-0 answer, not headers
    whole = tok.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in CHAT["messages"]], tokenize=False)
    assert tok.convert_ids_to_tokens(seq.ids) == tok.convert_ids_to_tokens(
        tok(whole, add_special_tokens=False)["input_ids"]
    )


def test_plain_rendering_without_a_template(tok) -> None:
    seq = D.encode_example(tok, CHAT, "chat", chat_format="plain")
    assert _trained(tok, seq) == ["4", "5", "</s>", "2", "3", "</s>"]
    assert tok.convert_ids_to_tokens(seq.ids)[:3] == ["<s>", "System:", "you"]
    comp = D.encode_example(tok, {"prompt": "count from 3 :", "completion": " 4 5"}, "completion")
    assert _trained(tok, comp) == ["4", "5", "</s>"] and comp.ids[0] == tok.bos_token_id
    tok_plain = type(tok).from_pretrained(tok.name_or_path)
    tok_plain.chat_template = None
    with pytest.raises(D.DataError, match="no chat template"):
        D.encode_example(tok_plain, CHAT, "chat", chat_format="template")


def test_packing_truncation_batches(tok) -> None:
    seqs = [D.encode_example(tok, CHAT, "chat")] * 10
    total = sum(len(s.ids) for s in seqs)
    width = next(w for w in range(13, 40) if total % w)  # leaves a shorter tail block
    packed = D.pack(seqs, width)
    assert all(len(b.ids) == width for b in packed[:-1]) and 0 < len(packed[-1].ids) <= width
    # prompt-only blocks are dropped; every trained token is kept
    assert all(b.trained_tokens for b in packed)
    assert sum(b.trained_tokens for b in packed) == sum(s.trained_tokens for s in seqs)
    assert sum(len(b.ids) for b in packed) <= total
    short = D.Tokens(packed[0].ids[:5], packed[0].labels[:5])
    ids, labels = D.pad_batch([packed[0], short], 0)
    assert len({len(r) for r in ids}) == 1 and labels[-1][-1] == D.IGNORE and ids[-1][-1] == 0
    cut, n = D.truncate(seqs, 16)
    assert n == 10 and len(cut) == 10 and all(len(s.ids) == 16 and s.trained_tokens for s in cut)
    assert D.truncate(seqs, 8) == ([], 10)  # cut before the first answer: nothing left to train on
    batches = D.epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 4] and {i for b in batches for i in b} == set(range(10))
    assert D.epoch_batches(10, 4, 0, 1) != batches and D.epoch_batches(10, 4, 0, 0) == batches


def test_an_example_with_nothing_to_train_is_a_data_error(tok) -> None:
    only_zero = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "1", "weight": 0}]}
    with pytest.raises(D.DataError, match="line 7: no trained tokens"):
        D.encode_all(tok, [(7, only_zero)], "chat")
