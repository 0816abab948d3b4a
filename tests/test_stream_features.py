"""The data stream's accounting, bad-data policy, loader workers, window shuffle and document masks,
each with exact resume (the order and states of tests/test_data.py and tests/test_elastic_data.py)."""

from __future__ import annotations

import json

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from data_pipelines import BadDataError, BatchStream, DataConfig, SourceConfig
from data_pipelines.accounting import KINDS
from data_pipelines.config import LayoutError
from data_pipelines.inspect_data import lines
from data_pipelines.objectives import segment_ids
from data_pipelines.stream import StreamStateError, merge_states
from data_pipelines.tokenizer import ByteTokenizer
from data_pipelines.trace import trace

EOS = ByteTokenizer().eos_id


def parquet_files(folder, files: int, docs) -> str:
    """`docs(f)`: the documents of file f."""
    folder.mkdir()
    for f in range(files):
        pq.write_table(pa.table({"text": docs(f)}), folder / f"part{f}.parquet")
    return str(folder)


def jsonl_files(folder, files: int, docs) -> str:
    """`docs(f)`: the documents of file f. (Mixed sources are JSON lines here: datasets sleeps 5 s each time
    an interleaved iterator over a parquet source ends or is dropped, apache/arrow#45214.)"""
    folder.mkdir()
    for f in range(files):
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(f)))
    return str(folder)


def jsonl_with_bad_records(folder, files: int) -> str:
    """Documents with, in every file, one record of each unusable kind a JSON-lines file can hold."""
    folder.mkdir()
    for f in range(files):
        good = [json.dumps({"text": f"j{f}.{i} " + "q" * (i % 5)}).encode() for i in range(12)]
        bad = [b"{not json", json.dumps({"title": "no text"}).encode(), json.dumps({"text": ""}).encode(),
               b'{"text": "\xff\xfe"}']
        (folder / f"part{f}.jsonl").write_bytes(b"\n".join(good[:6] + bad + good[6:]) + b"\n")
    return str(folder)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same_batches(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys, strict=True)
    )


def summed(metrics: list[dict]) -> dict:
    return {k: sum(m[k] for m in metrics) for k in metrics[0]}


def test_tokens_are_counted_per_source_and_follow_the_weights(tmp_path):
    a = jsonl_files(tmp_path / "a", 2, lambda f: ["a" * 15] * 300)  # 16 tokens with the end-of-document token
    b = jsonl_files(tmp_path / "b", 2, lambda f: ["b" * 15] * 300)
    cfg = DataConfig(sources=[{"path": a, "weight": 3}, {"path": b, "name": "bee"}], tokenizer="bytes", seq_len=32,
                     streams=2, seed=5, loader_workers=0)
    stream = BatchStream(cfg, 4)
    take(stream, 50)
    metrics = stream.metrics()
    assert set(metrics) == {"data/documents", "data/tokens/a", "data/tokens/bee", *(f"data/bad/{k}" for k in KINDS)}
    tokens = metrics["data/tokens/a"] + metrics["data/tokens/bee"]
    assert metrics["data/tokens/a"] / tokens == pytest.approx(0.75, abs=0.07)
    # Every token read is packed: emitted (a causal window advances seq_len tokens) or still in the packer.
    streams = stream.state_dict()["streams"].values()
    assert tokens == sum(s["windows"] * 32 + len(s["packer"]["buffer"]) for s in streams)
    assert metrics["data/documents"] == tokens / 16


@pytest.fixture
def with_bad_records(tmp_path) -> DataConfig:
    """A source with every kind of unusable record a JSON-lines file can hold, mixed with one whose only
    unusable records are empty documents."""
    jsonl = jsonl_with_bad_records(tmp_path / "j", 2)
    other = jsonl_files(tmp_path / "p", 2, lambda f: ["", f"p{f} " + "z" * 9, f"p{f} second", ""])
    return DataConfig(sources=[{"path": jsonl}, {"path": other}], tokenizer="bytes", seq_len=16, streams=2,
                      tokenize_batch=3, loader_workers=0, bad_data={"max_fraction": 0.6})


def test_bad_records_are_skipped_and_counted_the_same_on_any_worker_count_and_after_resume(with_bad_records):
    cfg = with_bad_records
    one = BatchStream(cfg, 4)
    batches = take(one, 30)
    expected = one.metrics()
    assert all(expected[f"data/bad/{k}"] > 0 for k in KINDS if k != "unreadable_file"), expected
    text = bytes(t for b in batches for t in b["input_ids"].flatten().tolist() if t < 256)
    assert b"not json" not in text and b"no text" not in text and b"j1.5" in text
    per_source = merge_states([one.state_dict()])["streams"]["0"]["counts"]["bad"]
    assert set(per_source[1]) == {"empty_document"}, "the second source only has empty documents"

    pair = [BatchStream(cfg, 2, rank, 2) for rank in range(2)]
    for worker in pair:
        take(worker, 30)
    assert summed([w.metrics() for w in pair]) == expected  # the same windows, so the same records

    first = BatchStream(cfg, 4)  # 12 steps on one worker, then 18 on two
    take(first, 12)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = [BatchStream(cfg, 2, rank, 2) for rank in range(2)]
    for worker in resumed:
        worker.load_state_dict(state)
        take(worker, 18)
    assert summed([w.metrics() for w in resumed]) == expected


def test_too_many_bad_records_stop_the_stream_with_what_to_change(with_bad_records, tmp_path):
    strict = DataConfig.model_validate({**with_bad_records.model_dump(),
                                        "bad_data": {"max_fraction": 0.2, "min_records": 20}})
    with pytest.raises(BadDataError) as err:
        take(BatchStream(strict, 4), 30)
    message = str(err.value)
    for part in ("unusable record(s) out of", "data.bad_data.max_fraction (20.0%)", "malformed_json",
                 f"source 'j' ({with_bad_records.sources[0].path})"):
        assert part in message
    late = DataConfig.model_validate({**strict.model_dump(), "bad_data": {"max_fraction": 0.2, "min_records": 10**6}})
    take(BatchStream(late, 4), 30)  # not enforced before min_records records

    # policy fail, read by a loader worker: the training process raises the error itself, without the
    # worker's traceback in the message.
    jsonl = jsonl_with_bad_records(tmp_path / "fail", 1)
    cfg = DataConfig(sources=[{"path": jsonl}], tokenizer="bytes", seq_len=16, streams=1, loader_workers=1,
                     bad_data={"policy": "fail"})
    with pytest.raises(BadDataError, match=r"holds an unusable record \(malformed_json\).*policy is 'fail'") as err:
        take(BatchStream(cfg, 1), 20)
    assert "Traceback" not in str(err.value)


def test_loader_workers_give_the_same_rows_and_states_and_resume_exactly(tmp_path):
    source = parquet_files(tmp_path / "d", 4, lambda f: [f"file {f} doc {i} " + "w" * (i % 6) for i in range(9)])
    cfg = DataConfig(sources=[{"path": source}], tokenizer="bytes", seq_len=16, tokenize_batch=2, streams=4,
                     shuffle_buffer=3, document_mask=True, loader_workers=0)
    reference = BatchStream(cfg, 4)
    head = take(reference, 15)
    state_at_15 = reference.state_dict()
    uninterrupted = head + take(reference, 45)

    two = cfg.model_copy(update={"loader_workers": 2})  # 4 streams: 2 per loader worker
    first = BatchStream(two, 4)
    rows = take(first, 15)
    assert first.state_dict() == state_at_15, "the state is that of the rows taken, whatever the workers read ahead"
    with_workers = loader_processes()
    state = json.loads(json.dumps(first.state_dict()))
    del first  # its DataLoader stops its workers
    assert with_workers - loader_processes() >= 2, "two loader worker processes did the reading"
    second = BatchStream(two, 4)
    second.load_state_dict(state)
    rows += take(second, 20)
    third = BatchStream(two, 4)
    third.load_state_dict(second.state_dict())  # a second resume
    rows += take(third, 25)
    assert min(s["epoch"] for s in third.state_dict()["streams"].values()) >= 1, "resumes across epochs"
    assert same_batches(rows, uninterrupted)
    assert third.metrics() == reference.metrics()


def loader_processes() -> int:
    """Live processes forked by this process's forkserver (its loader workers, and the server itself)."""
    count = 0
    for process in psutil.Process().children(recursive=True):
        try:
            count += "forkserver" in " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            pass
    return count


def test_shuffle_reorders_windows_and_resumes_exactly_on_any_worker_count(tmp_path):
    source = parquet_files(tmp_path / "d", 4, lambda f: [f"f{f}.{i} " + "s" * (2 * i + f) for i in range(5)])
    plain = DataConfig(sources=[{"path": source}], tokenizer="bytes", seq_len=16, tokenize_batch=2, streams=4,
                       seed=2, loader_workers=0)
    shuffled = plain.model_copy(update={"shuffle_buffer": 5})
    one = trace(shuffled, 16, 8, world=1)
    assert one.steps != trace(plain, 16, 8, world=1).steps
    # Same-count resume, then 2 → 1 → 2, resumes after epoch boundaries.
    assert trace(shuffled, 16, 8, world=2, micro_batch=2, resumes=[(4, 2), (7, 1), (11, 2)]).steps == one.steps

    # One stream: the shuffle only reorders windows, holding each back by at most the buffer.
    single = [c.model_copy(update={"streams": 1, "sources": (SourceConfig(path=str(tmp_path / "d" / "part0.parquet")),)})
              for c in (plain, shuffled)]
    plain_rows, shuffled_rows = ([tuple(r) for b in take(BatchStream(c, 1), n) for r in b["input_ids"].tolist()]
                                 for c, n in zip(single, (45, 40), strict=True))
    assert shuffled_rows != plain_rows[:40]
    remaining = list(plain_rows)
    for row in shuffled_rows:
        remaining.remove(row)  # every shuffled window is one of the plain stream's first 45
    with pytest.raises(StreamStateError, match="data.shuffle_buffer is 0.*set it back to 5"):
        stream = BatchStream(shuffled, 4)
        next(stream)
        BatchStream(plain, 4).load_state_dict(stream.state_dict())


def test_segment_ids_mark_the_documents_of_each_row(tmp_path):
    docs = ["ab", "cdefg", "h", "ijklmnopqrstuvwxyz", "0123"]
    source = parquet_files(tmp_path / "d", 1, lambda f: docs)
    cfg = DataConfig(sources=[{"path": source}], tokenizer="bytes", seq_len=8, streams=1, document_mask=True,
                     loader_workers=0)
    batches = take(BatchStream(cfg, 2), 6)
    first = batches[0]
    assert first["input_ids"][0].tolist() == [*b"ab", EOS, *b"cdefg"]
    assert first["segment_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # the end token belongs to its document
    # The next row starts with the end of "cdefg": ids start at 0 in every row, whatever document it is.
    assert first["input_ids"][1].tolist() == [EOS, *b"h", EOS, *b"ijklm"]
    assert first["segment_ids"][1].tolist() == [0, 1, 1, 2, 2, 2, 2, 2]
    for b in batches:
        ids, seg = b["input_ids"], b["segment_ids"]
        assert torch.equal(seg, segment_ids(ids, EOS)) and (seg[:, 0] == 0).all()
        assert torch.equal(seg[:, 1:] - seg[:, :-1], (ids[:, :-1] == EOS).long())
    with pytest.raises(ValidationError, match="data.document_mask applies to the causal objective only"):
        DataConfig(sources=[{"path": source}], objective={"kind": "mlm"}, document_mask=True)


def test_layouts_names_and_states_that_cannot_work_are_refused(tmp_path):
    cfg = DataConfig(sources=[{"path": "x"}], streams=8, loader_workers=3)
    with pytest.raises(LayoutError, match=r"data.loader_workers \(3\) must divide .* = 4\).*one of 0, 1, 2, 4"):
        cfg.check_layout(global_batch=8, workers=2)
    assert [SourceConfig(path=p).label for p in ("corpus/web/*.jsonl.gz", "s3://bucket/x/data.parquet", "owner/ds")] \
        == ["web", "data", "ds"]
    with pytest.raises(ValidationError, match="several sources are named 'train'.*distinct `name:`"):
        DataConfig(sources=[{"path": "a/train"}, {"path": "b/train"}])
    DataConfig(sources=[{"path": "a/train"}, {"path": "b/train", "name": "b"}])

    source = parquet_files(tmp_path / "d", 1, lambda f: ["some text"] * 3)
    stream = BatchStream(DataConfig(sources=[{"path": source}], tokenizer="bytes", seq_len=8, streams=1,
                                    loader_workers=0), 1)
    old = {k: v for k, v in stream.state_dict().items() if k != "format"}
    with pytest.raises(StreamStateError, match="has format 1 and this zeroray reads format 2.*--fresh"):
        stream.load_state_dict(old)


def test_inspect_shows_token_shares_and_bad_records(with_bad_records):
    out = "\n".join(lines(with_bad_records))
    assert "source j (" in out and "source p (" in out
    # Both sources are sampled whole: 2 files each, with one record of every kind / two empty documents.
    assert "unusable: empty_document 2, malformed_json 2, no_text_field 2, undecodable_utf8 2" in out
    assert "unusable: empty_document 4" in out
    mixed = next(line for line in out.splitlines() if line.startswith("mixed streams"))
    assert "token share j " in mixed and "unusable records: malformed_json " in mixed and "empty_document" in mixed
