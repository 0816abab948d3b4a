"""The streaming pipeline: packing, logical streams, exact resume, data preparation.

(Resuming on another worker count: tests/test_elastic_data.py.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from data_pipelines import BatchStream, DataConfig, EmptyDataError
from data_pipelines.packing import Packer
from data_pipelines.tokenizer import EOS_TOKEN, ByteTokenizer


def jsonl_docs(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def byte_config(path, seq_len=16, streams=1, loader_workers=0, **kw) -> DataConfig:
    # Read in-process by default: loader workers give the same rows (tests/test_stream_features.py) and
    # each BatchStream would start processes of its own.
    return DataConfig(sources=[{"path": str(path)}], tokenizer="bytes", seq_len=seq_len, tokenize_batch=3,
                      streams=streams, loader_workers=loader_workers, **kw)


def test_packer_keeps_every_token_and_separates_documents():
    packer = Packer(window=6, stride=5, eos_id=99)
    docs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    windows = []
    for d in docs:
        packer.add(d)
        while (w := packer.pop()) is not None:
            windows.append(w)
    stream = [1, 2, 3, 99, 4, 5, 6, 7, 8, 9, 10, 99, 11, 99]
    assert all(len(w) == 6 for w in windows)
    # consecutive windows overlap by one token: inputs w[:-1] + the last label cover the stream
    rebuilt = [t for w in windows for t in w[:-1]] + windows[-1][-1:] + packer.buffer[1:]
    assert rebuilt == stream


def test_batches_are_the_documents_in_order_with_eos(tmp_path):
    docs = [f"document number {i} " * (i % 4 + 1) for i in range(30)]
    stream = BatchStream(byte_config(jsonl_docs(tmp_path / "d.jsonl", docs)), micro_batch=2)
    tok = ByteTokenizer()
    expected = []
    for d in docs:
        expected += list(d.encode()) + [tok.eos_id]
    got: list[int] = []
    while len(got) < 400:
        b = next(stream)
        assert b["input_ids"].shape == (2, 16)
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels are inputs shifted by one
        for row_in, row_lab in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
            got += row_in
            last_label = row_lab[-1]
    assert got == expected[: len(got)]
    assert last_label == expected[len(got)]


def take(stream, n):
    return [next(stream)["input_ids"] for _ in range(n)]


def two_file_corpus(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for f in range(2):
        jsonl_docs(folder / f"part{f}.jsonl", [f"file {f} doc {i}: " + "xyz" * (i % 9) for i in range(20)])
    return folder


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("corpus", ["bpe", "bytes"])
def test_resume_gives_the_same_batches_twice_and_across_epochs(small_corpus, tmp_path, world, corpus):
    if corpus == "bpe":  # real text, trained tokenizer; 4 shards → 4 logical streams
        cfg = DataConfig(sources=[{"path": str(small_corpus / "train")}],
                         tokenizer=str(small_corpus / "tokenizer.json"), seq_len=64, tokenize_batch=2, streams=4)
    else:  # small enough that 150 batches pass several epochs
        cfg = byte_config(two_file_corpus(tmp_path), streams=2)
    for rank in range(world):
        ref = BatchStream(cfg, 4, rank, world)
        uninterrupted = take(ref, 150)
        a = BatchStream(cfg, 4, rank, world)
        first = take(a, 20)
        state = a.state_dict()
        b = BatchStream(cfg, 4, rank, world)
        b.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
        second = take(b, 30)
        c = BatchStream(cfg, 4, rank, world)
        c.load_state_dict(b.state_dict())  # a second resume
        third = take(c, 100)
        if corpus == "bytes":
            assert epochs(c) >= 2 and epochs(b) >= 1, "resumes must also happen after an epoch boundary"
        resumed = first + second + third
        assert all(torch.equal(x, y) for x, y in zip(uninterrupted, resumed, strict=True))


def epochs(stream: BatchStream) -> int:
    """The pass over the data that every stream of this worker has reached."""
    return min(s["epoch"] for s in stream.state_dict()["streams"].values())


def test_state_saved_before_the_first_batch_or_between_epochs_restarts_the_epoch(tmp_path):
    cfg = byte_config(two_file_corpus(tmp_path), streams=2)
    fresh = BatchStream(cfg, 4)
    state = fresh.state_dict()
    nothing_read = {"documents": [0], "tokens": [0], "bad": [{}]}
    assert state == {"format": 2, "num_streams": 2,
                     "streams": {str(i): {"windows": 0, "epoch": 0, "docs_in_epoch": 0, "position": None,
                                          "packer": {"buffer": []}, "shuffle": None, "counts": nothing_read}
                                 for i in range(2)}}
    resumed = BatchStream(cfg, 4)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(BatchStream(cfg, 4), 40), take(resumed, 40), strict=True))


def test_streams_read_disjoint_shards_and_workers_deal_them_round_robin(small_corpus):
    cfg = DataConfig(sources=[{"path": str(small_corpus / "train")}], tokenizer=str(small_corpus / "tokenizer.json"),
                     seq_len=64, streams=4)
    # Stream i alone (1 worker per stream, 4 workers) vs. worker 0 of 2, which reads streams 0 and 2 in turn.
    alone = {i: take(BatchStream(cfg, 2, i, 4), 2) for i in range(4)}
    assert not any(torch.equal(x, y) for i in range(4) for j in range(i) for x in alone[i] for y in alone[j])
    worker0 = torch.cat(take(BatchStream(cfg, 2, 0, 2), 4))
    dealt = torch.stack([alone[i][k // 2][k % 2] for k in range(4) for i in (0, 2)])
    assert torch.equal(worker0, dealt)


def test_text_files_are_whole_documents(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("line one\nline two\n")
    (folder / "b.txt").write_text("other\n")
    stream = BatchStream(byte_config(folder, seq_len=8), micro_batch=1)
    ids = [t for b in take(stream, 4) for t in b[0].tolist()]
    eos = ByteTokenizer().eos_id
    assert ids[:19] == list(b"line one\nline two\n") + [eos]


def test_empty_documents_are_skipped_and_all_empty_is_an_error(tmp_path):
    stream = BatchStream(byte_config(jsonl_docs(tmp_path / "d.jsonl", ["", "abc", ""]), seq_len=8), micro_batch=1)
    ids = take(stream, 2)[0][0].tolist()
    assert ids[:4] == [97, 98, 99, 256]
    with pytest.raises(EmptyDataError, match="produced no tokens"):
        next(BatchStream(byte_config(jsonl_docs(tmp_path / "e.jsonl", ["", ""])), micro_batch=1))


def test_weighted_mixing_follows_the_weights(tmp_path):
    a = jsonl_docs(tmp_path / "a.jsonl", ["a" * 7] * 400)
    b = jsonl_docs(tmp_path / "b.jsonl", ["b" * 7] * 400)
    cfg = DataConfig(sources=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}],
                     tokenizer="bytes", seq_len=64, seed=1, streams=1)
    ids = torch.cat(take(BatchStream(cfg, 4), 10)).flatten()
    share_a = (ids == ord("a")).sum().item() / ((ids == ord("a")).sum() + (ids == ord("b")).sum()).item()
    assert 0.68 < share_a < 0.82


def test_prepare_writes_shards_validation_and_a_tokenizer(small_corpus):
    shards = sorted((small_corpus / "train").glob("*.parquet"))
    assert len(shards) == 4
    assert all(pq.read_metadata(s).num_rows > 0 for s in shards)
    train_paths = {p for s in shards for p in pq.read_table(s)["path"].to_pylist()}
    val_paths = set(pq.read_table(small_corpus / "val" / "shard-00000.parquet")["path"].to_pylist())
    assert val_paths and not (train_paths & val_paths)
    tok = Tokenizer.from_file(str(small_corpus / "tokenizer.json"))
    assert tok.get_vocab_size() == 512 and tok.token_to_id(EOS_TOKEN) is not None
    text = "def f(x):\n    return x  # ünïcödé"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless round trip


def test_fsspec_url_source(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/zr-test/docs.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": f"remote doc {i}"}) + "\n" for i in range(5)))
    stream = BatchStream(byte_config("memory://zr-test/docs.jsonl", seq_len=8), micro_batch=1)
    ids = [t for b in take(stream, 3) for t in b[0].tolist()]
    assert ids[:11] == list(b"remote doc ")


def test_unreachable_hub_name_and_missing_path_are_clear_errors(tmp_path):
    from data_pipelines import SourceError

    with pytest.raises(SourceError, match="not a local file or folder, and the Hugging Face Hub could not open it"):
        next(BatchStream(byte_config("someone/no-such-dataset"), micro_batch=1))
    with pytest.raises(SourceError, match="does not exist"):
        next(BatchStream(byte_config(tmp_path / "missing.jsonl"), micro_batch=1))


def test_saving_again_before_the_next_document_keeps_the_position(tmp_path):
    # datasets reports the start of the epoch until the first example after a load is read: a resumed
    # stream still inside one long document must save the position it loaded.
    docs = ["short", "a long document " * 40, "after the long one", "last"]
    cfg = byte_config(jsonl_docs(tmp_path / "d.jsonl", docs), seq_len=8)
    uninterrupted = take(BatchStream(cfg, 1), 120)
    first = BatchStream(cfg, 1)
    head = take(first, 5)
    second = BatchStream(cfg, 1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    middle = take(second, 3)  # still inside the long document: no example read since the load
    third = BatchStream(cfg, 1)
    third.load_state_dict(json.loads(json.dumps(second.state_dict())))
    tail = take(third, 112)
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted, head + middle + tail, strict=True))
