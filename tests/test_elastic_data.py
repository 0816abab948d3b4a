"""Elastic resume of the data: the global batches do not depend on the number of workers, before
or after a resume on another worker count; layouts that cannot guarantee it are refused."""

from __future__ import annotations

import json

import pytest

from data_pipelines import BatchStream, DataConfig, SourceError
from data_pipelines.config import LayoutError
from data_pipelines.stream import StreamStateError, merge_states
from data_pipelines.trace import trace

STEPS, GLOBAL_BATCH = 24, 8


def write_files(folder, files: int, docs: int, tag: str):
    folder.mkdir()
    for f in range(files):
        lines = [json.dumps({"text": f"{tag}{f}.{i} " + "xy" * (3 * i + f)}) for i in range(docs)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def mixed(tmp_path) -> DataConfig:
    """Two weighted sources of 4 files each, 4 logical streams; 24 steps pass several epochs of every stream."""
    a = write_files(tmp_path / "a", 4, 4, "a")
    b = write_files(tmp_path / "b", 4, 2, "b")
    return DataConfig(sources=[{"path": str(a), "weight": 2}, {"path": str(b)}], tokenizer="bytes",
                      seq_len=16, tokenize_batch=3, streams=4, seed=3, loader_workers=0)


def test_global_batches_do_not_depend_on_the_worker_count(mixed):
    one = trace(mixed, STEPS, GLOBAL_BATCH, world=1)
    assert len(set(one.steps)) == STEPS, "every step holds other rows"
    assert trace(mixed, STEPS, GLOBAL_BATCH, world=2).steps == one.steps
    assert trace(mixed, STEPS, GLOBAL_BATCH, world=4, micro_batch=1).steps == one.steps  # 2 accumulation steps
    other_seed = trace(mixed.model_copy(update={"seed": 4}), STEPS, GLOBAL_BATCH, world=1)
    assert other_seed.overall != one.overall


@pytest.mark.parametrize("world, resumes", [
    (2, [(7, 1), (15, 2)]),  # 2 → 1 → 2, the second resume after an epoch boundary
    (1, [(5, 4), (11, 2), (20, 1)]),
    (4, [(1, 2), (2, 4)]),  # resumes right after the start
])
def test_resuming_on_other_worker_counts_skips_and_repeats_nothing(mixed, world, resumes):
    uninterrupted = trace(mixed, STEPS, GLOBAL_BATCH, world=1)
    resumed = trace(mixed, STEPS, GLOBAL_BATCH, world=world, micro_batch=1, resumes=resumes)
    assert resumed.steps == uninterrupted.steps and resumed.overall == uninterrupted.overall
    assert resumed.schedule == ((0, world), *resumes)


@pytest.mark.parametrize("objective", [{"kind": "mlm"}, {"kind": "span_corruption", "mean_span_length": 2}])
def test_masks_and_spans_follow_the_window_not_the_worker(mixed, objective):
    cfg = DataConfig.model_validate({**mixed.model_dump(), "objective": objective, "seq_len": 32})
    uninterrupted = trace(cfg, 12, GLOBAL_BATCH, world=1)
    assert trace(cfg, 12, GLOBAL_BATCH, world=4, resumes=[(5, 2), (9, 1)]).steps == uninterrupted.steps


def test_real_text_with_a_trained_tokenizer(small_corpus):
    cfg = DataConfig(sources=[{"path": str(small_corpus / "train")}], tokenizer=str(small_corpus / "tokenizer.json"),
                     seq_len=32, tokenize_batch=2, streams=4)
    assert trace(cfg, 6, 8, world=2, resumes=[(3, 1)]).steps == trace(cfg, 6, 8, world=4).steps


def test_the_union_of_worker_states_is_the_single_worker_state(mixed):
    single, pair = BatchStream(mixed, 4), [BatchStream(mixed, 2, rank, 2) for rank in range(2)]
    for _ in range(5):
        next(single), next(single)
        for worker in pair:
            next(worker), next(worker)
    states = [json.loads(json.dumps(w.state_dict())) for w in pair]
    assert [sorted(s["streams"]) for s in states] == [["0", "2"], ["1", "3"]]  # nothing else per worker
    assert merge_states(states) == json.loads(json.dumps(single.state_dict()))


def test_sources_with_too_few_shards_are_refused(tmp_path, mixed):
    three = write_files(tmp_path / "three", 3, 2, "t")
    cfg = mixed.model_copy(update={"sources": (*mixed.sources, mixed.sources[0].model_copy(
        update={"path": str(three)}))})
    with pytest.raises(SourceError) as err:
        BatchStream(cfg, 4)
    message = str(err.value)
    for part in (repr(str(three)), "has 3 shard(s)", "data.streams = 4", "a divisor of 3",
                 "zeroray data prepare --shards 4"):
        assert part in message


def test_batches_and_worker_counts_that_do_not_fit_the_streams_are_refused(mixed):
    with pytest.raises(LayoutError, match=r"data.streams \(4\) must divide the global batch \(6 rows"):
        BatchStream(mixed, micro_batch=3, world=2)
    with pytest.raises(LayoutError, match=r"data.streams \(4\) must be a multiple of the worker count \(3\)"):
        BatchStream(mixed, micro_batch=4, rank=0, world=3)
    with pytest.raises(LayoutError, match="set data.streams to one of 1, 2, 3, 6"):
        mixed.check_layout(global_batch=6, workers=1)
    with pytest.raises(LayoutError, match="micro-batches of 3 rows on 2 worker"):
        trace(mixed, 2, GLOBAL_BATCH, world=2, micro_batch=3)


def test_states_that_cannot_resume_here_are_refused(mixed):
    worker0 = BatchStream(mixed, 2, 0, 2)
    next(worker0)
    with pytest.raises(StreamStateError, match=r"lacks logical stream\(s\) \[1, 3\], which worker 1 of 2 reads"):
        BatchStream(mixed, 2, 1, 2).load_state_dict(worker0.state_dict())
    uneven = BatchStream(mixed, 1, grad_accum=4)  # one row read: stream 0 is a window ahead of the others
    next(uneven)
    with pytest.raises(StreamStateError, match=r"not at the same optimizer step .*\{0: 1, 1: 0, 2: 0, 3: 0\}"):
        BatchStream(mixed, 4).load_state_dict(uneven.state_dict())
    worker1 = BatchStream(mixed, 2, 1, 2)
    next(worker1), next(worker1)  # a step further than worker 0: not one checkpoint
    with pytest.raises(StreamStateError, match="not at the same optimizer step"):
        BatchStream(mixed, 4).load_state_dict(merge_states([worker0.state_dict(), worker1.state_dict()]))
    with pytest.raises(StreamStateError, match="has 4 logical streams but data.streams is 2.*set it back to 4"):
        BatchStream(mixed.model_copy(update={"streams": 2}), 2).load_state_dict(worker0.state_dict())
    with pytest.raises(StreamStateError, match="written before data.streams existed"):
        BatchStream(mixed, 4).load_state_dict({"epoch": 0, "batches": 3, "stream": None, "packer": {"buffer": []}})
    with pytest.raises(StreamStateError, match="disagree on logical stream 0"):
        merge_states([worker0.state_dict(), BatchStream(mixed, 2, 0, 2).state_dict()])
