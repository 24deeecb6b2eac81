"""Datasets: record formats and their loss masks, file:line errors, remote paths, packing, the resumable data order."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from raymoe.finetune.batches import BatchPlan, collate, eval_batches
from raymoe.finetune.data import DataError, load_examples, read_jsonl
from raymoe.finetune.tokens import build_rows, split_examples, tokenize

from ft_helpers import QA


@pytest.fixture(scope="module")
def tok(tiny32):
    return AutoTokenizer.from_pretrained(tiny32)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def targets(tok, example) -> str:
    ids, mask = tokenize(example, tok)
    assert len(ids) == len(mask)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_loss_masks_cover_exactly_what_is_learned(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
                      {"role": "assistant", "content": "Madrid."}]},
        {"prompt": "Two plus two is", "completion": " four."},
        {"text": "def f(x):\n    return x"},
    ])
    chat, completion, text = read_jsonl(str(f))
    assert (chat.kind, completion.kind, text.kind) == ("chat", "completion", "text")
    eos = tok.eos_token
    assert targets(tok, chat) == f"Paris.{eos}Madrid.{eos}"          # both assistant turns, nothing else
    assert targets(tok, completion) == f" four.{eos}"
    ids, mask = tokenize(text, tok)
    assert all(mask) and tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"
    assert chat.source == f"{f}:1"


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"question": "q", "answer": "a"}', "unknown record shape"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be"),
    ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_is_reported_with_file_and_line(tmp_path, line, problem):
    good = json.dumps({"prompt": "a", "completion": "b"})
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        read_jsonl(str(f))
    assert str(e.value).startswith(f"{f}:4: ") and problem in str(e.value)
    assert len(read_jsonl(str(f), on_bad_line="skip")) == 3


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: dataset file not found"):
        load_examples([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"data.train: .*empty.jsonl: no examples \(empty dataset\)"):
        load_examples([str(tmp_path / "empty.jsonl")])


def test_uri_paths_read_through_fsspec():
    assert [e.record for e in load_examples([f"file://{QA}"])] == [e.record for e in load_examples([str(QA)])]
    with pytest.raises(DataError, match="dataset file not found"):
        load_examples([f"file://{QA}.missing"])


def test_object_store_style_uri_reads_like_a_local_file():
    """A non-local filesystem (fsspec's in-memory store stands in for s3:// or gs://, which need credentials):
    the same records, and a malformed line is reported with the URI and its line number."""
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://bucket/qa.jsonl", "wt") as f:
        f.write(QA.read_text())
    assert [e.record for e in load_examples(["memory://bucket/qa.jsonl"])] == \
        [e.record for e in load_examples([str(QA)])]
    with fsspec.open("memory://bucket/bad.jsonl", "wt") as f:
        f.write('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"memory://bucket/bad.jsonl:2"):
        load_examples(["memory://bucket/bad.jsonl"])


def test_packing_and_truncation(tok):
    examples = load_examples([str(QA)])
    single = [tokenize(e, tok) for e in examples]
    packed, stats = build_rows(examples, tok, max_seq_len=16, packing=True)
    total = sum(len(ids) for ids, _ in single)
    assert stats.tokens == total and len(packed) == -(-total // 16)
    assert all(len(packed.row(i)[0]) == 16 for i in range(len(packed) - 1))
    assert packed.ids.tolist() == [t for ids, _ in single for t in ids]
    assert packed.mask.tolist() == [m for _, ms in single for m in ms]
    rows, stats = build_rows(examples, tok, max_seq_len=12, packing=False)
    assert len(rows) == len(examples)
    assert stats.truncated == sum(len(ids) > 12 for ids, _ in single) > 0
    assert [rows.row(i)[0].tolist() for i in range(len(rows))] == [ids[:12] for ids, _ in single]


def test_validation_split_is_seeded_and_disjoint():
    examples = load_examples([str(QA)])
    train, val = split_examples(examples, 0.25, seed=5)
    assert len(val) == 2 and len(train) == 6 and not {e.source for e in train} & {e.source for e in val}
    assert split_examples(examples, 0.25, seed=5) == (train, val)


def test_data_order_is_a_function_of_the_step_alone():
    """What a step reads does not depend on how many workers read it, so resuming (even elastically) is exact."""
    plans = {w: [BatchPlan(40, 8, 2, w, r, seed=1) for r in range(w)] for w in (1, 2, 4)}
    for step in (0, 4, 5, 13):
        rows = {w: sorted(np.concatenate([b for p in ps for b in p.micro_batches(step)]).tolist())
                for w, ps in plans.items()}
        assert rows[1] == rows[2] == rows[4] == sorted(plans[2][1].step_rows(step).tolist()) and len(rows[1]) == 8
    one = plans[1][0]
    epoch0 = np.concatenate([np.concatenate(one.micro_batches(s)) for s in range(5)])
    epoch1 = np.concatenate([np.concatenate(one.micro_batches(s)) for s in range(5, 10)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(40))     # each epoch: every row once
    assert epoch0.tolist() != epoch1.tolist()                                          # reshuffled per epoch
    assert plans[2][0].accumulation == 2 and plans[4][0].accumulation == 1
    assert sorted(np.concatenate([np.concatenate(eval_batches(7, 2, 2, r)) for r in (0, 1)]).tolist()) == \
        list(range(7))


def test_collate_pads_without_targets(tok):
    rows, _ = build_rows(load_examples([str(QA)]), tok, 64, packing=False)
    ids, mask = collate(rows, np.array([0, 7]), pad_id=tok.pad_token_id)
    n0 = len(rows.row(0)[0])
    assert ids.shape == (2, max(n0, len(rows.row(7)[0])))
    assert (ids[0, n0:] == tok.pad_token_id).all() and (mask[0, n0:] == 0).all()
    tokens, main, mtp = rows.row_counts()
    assert tokens[[0, 7]].tolist() == [n0, len(rows.row(7)[0])]
    assert main[[0, 7]].tolist() == mask[:, 1:].sum(1).tolist() and mtp[[0, 7]].tolist() == mask[:, 2:].sum(1).tolist()
