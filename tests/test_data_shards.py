"""Token shards: a corpus is tokenized once (datasets.map, in parallel) and packed into uint16 /
uint32 shards on disk; every reader maps them and reads only the rows it asks for."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_tokenizer
from pdc.errors import PdcError
from pdc.inputs import data as data_mod
from pdc.inputs.data import split_blocks, take, token_blocks
from pdc.inputs.shards import Blocks, ShardedArray, ShardWriter, token_dtype, write_rows
from pdc.lang.settings import DataSource


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))


def write_corpus(path, n_docs: int, seed: int = 0, words: int = 12):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7)))
                            for _ in range(rng.randint(1, words)))
            # blank and whitespace-only documents are skipped, as they always were
            f.write(json.dumps({"text": text if i % 17 else "   "}) + "\n")
    return path


def reference_blocks(texts, tokenizer, seq_len):
    """The packing rule written out plainly: documents joined with EOS, cut into blocks, tail dropped."""
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def test_shards_hold_exactly_the_packed_corpus_whatever_the_number_of_processes(tmp_path):
    """1 and 2 tokenizing processes give the same shards, equal to the plain packing rule, stored
    as uint16 (the vocabulary fits)."""
    src = DataSource("jsonl", str(write_corpus(tmp_path / "c.jsonl", 300)))
    tok = make_tiny_tokenizer()
    records = [json.loads(line) for line in Path(src.ref).read_text().splitlines() if line.strip()]
    texts = [r["text"] for r in records if r["text"].strip()]  # a blank document packs to nothing
    ref = reference_blocks(texts, tok, 32)
    one = token_blocks(src, tok, 32, num_proc=1)
    assert one.array.dtype == np.uint16 and one.shape == tuple(ref.shape)
    assert torch.equal(one.read(), ref)
    (tmp_path / "cache").rename(tmp_path / "cache1")  # force a second tokenization with 2 processes
    two = token_blocks(src, tok, 32, num_proc=2)
    assert torch.equal(two.read(), ref)
    assert two.array.meta["documents"] == sum(1 for t in texts if t.strip())


def test_a_corpus_is_tokenized_once(tmp_path, monkeypatch):
    src = DataSource("jsonl", str(write_corpus(tmp_path / "c.jsonl", 50)))
    tok = make_tiny_tokenizer()
    first = token_blocks(src, tok, 16)

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_mod, "tokenize_dataset", fail)
    again = token_blocks(src, tok, 16)
    assert again.array.dir == first.array.dir and torch.equal(again.read(), first.read())
    with pytest.raises(AssertionError, match="tokenized again"):
        token_blocks(src, tok, 8)  # another seq_len is another set of shards


def test_an_edited_corpus_gets_new_shards(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", 50)
    tok = make_tiny_tokenizer()
    a = token_blocks(DataSource("jsonl", str(path)), tok, 16)
    write_corpus(path, 60, seed=1)
    b = token_blocks(DataSource("jsonl", str(path)), tok, 16)
    assert a.array.dir != b.array.dir and not torch.equal(a[:3].read(), b[:3].read())


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    """Ids above 65,535 survive the round trip through the shards."""
    rows = np.arange(70_000, 70_000 + 6 * 8, dtype=np.int64).reshape(6, 8) % 100_000
    assert token_dtype(100_000) == np.uint32 and token_dtype(65_536) == np.uint16
    write_rows(tmp_path / "big", rows.astype(token_dtype(100_000)))
    blocks = Blocks.open(tmp_path / "big")
    assert blocks.array.dtype == np.uint32
    assert torch.equal(blocks.read(), torch.from_numpy(rows))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), per_shard=st.integers(1, 9), picks=st.lists(st.integers(0, 10_000), max_size=20))
def test_reads_across_shard_files_return_the_written_rows(tmp_path_factory, n, per_shard, picks):
    """Rows split over many files read back in any order, with repeats, as written."""
    rows = np.random.default_rng(n).integers(0, 60_000, size=(n, 5)).astype(np.uint16)
    directory = tmp_path_factory.mktemp("rows")
    writer = ShardWriter(directory, "tokens", np.uint16, (5,), rows_per_shard=per_shard)
    for chunk in np.array_split(rows, 3):
        writer.append(chunk)
    writer.close({})
    array = ShardedArray(directory)
    assert len(array.info["shards"]) == -(-n // per_shard)
    idx = np.array([p % n for p in picks], dtype=np.int64)
    assert np.array_equal(array.take(idx), rows[idx])


def test_views_read_only_their_rows_and_travel_as_json(tmp_path):
    rows = np.arange(40, dtype=np.uint16).reshape(10, 4)
    view = Blocks.open(write_rows(tmp_path / "r", rows))
    train, val = split_blocks(view, 0.2)
    assert (len(train), len(val)) == (8, 2)
    assert torch.equal(val.read(), torch.from_numpy(rows[8:].astype(np.int64)))
    again = Blocks.from_json(json.loads(json.dumps(train.to_json())))
    assert torch.equal(again.read([1, 7]), torch.from_numpy(rows[[1, 7]].astype(np.int64)))
    picked = take(view, 3, seed=5)
    assert torch.equal(Blocks.from_json(picked.to_json()).read(), picked.read())
    assert len(set(picked.rows().tolist())) == 3


def test_text_too_short_for_one_block_says_how_many_tokens_there_are(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(PdcError, match=r"data jsonl\('.*c.jsonl'\) has 4 tokens, but one block of seq_len=64 needs 64"):
        token_blocks(DataSource("jsonl", str(tmp_path / "c.jsonl")), make_tiny_tokenizer(), 64, stage="prune")


def test_fewer_blocks_than_samples_is_refused_with_both_numbers(tmp_path):
    view = Blocks.open(write_rows(tmp_path / "r", np.zeros((5, 8), dtype=np.uint16)), label="data 'wiki'")
    with pytest.raises(PdcError) as info:
        take(view, 16, what="samples", stage="prune")
    assert info.value.message == ("data 'wiki' has 5 block(s) of seq_len=8 (40 tokens), but samples=16 "
                                  "were asked for: lower samples= or seq_len=, or give more text")
    assert info.value.stage == "prune"
    assert take(view, 5) is view  # exactly as many: all of them, in order
    with pytest.raises(PdcError, match=r"data 'wiki' has 1 block\(s\) of seq_len=8: too few to hold out 1"):
        split_blocks(view[:1], 0.05)


def test_a_truncated_shard_is_a_clear_error(tmp_path):
    directory = write_rows(tmp_path / "r", np.zeros((6, 8), dtype=np.uint16))
    shard = directory / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(PdcError, match=r"tokens-00000.bin has 93 bytes, its index says 96: delete .* to rebuild it"):
        Blocks.open(directory).read([0])
