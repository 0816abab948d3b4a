"""The data pipeline alone: zeroray's `BatchStream` against the loader most tutorials write.

Both read the run spec's parquet files with its tokenizer and deliver micro-batches of
micro_batch_size × seq_len tokens, on one rank's threads (the caller sets the environment):

- zeroray: `BatchStream` of rank 0 of a 1-worker run, with the spec's data settings as they are
  (data.loader_workers, tokenize_batch, logical streams);
- naive: `datasets.load_dataset(..., streaming=True).map(tokenize one example)` with the same
  tokenizer behind `transformers.PreTrainedTokenizerFast`, packed into windows by a small
  IterableDataset, batched by a plain `torch.utils.data.DataLoader` (num_workers=0).

Each reports the seconds to its first batch and then the tokens/s of BATCHES batches after BATCHES warm-up ones,
enough that zeroray's batched tokenization (tokenize_batch documents per logical stream at a time)
is amortised. The two alternate, REPEATS times each; the median counts. Prints one JSON line.

    python bench/pipeline_throughput.py CONFIG BATCHES REPEATS
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch


def zeroray_batches(spec):
    from data_pipelines import BatchStream

    return BatchStream(spec.data, spec.trainer.micro_batch_size, rank=0, world=1)


def naive_batches(spec):
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.tokenizer import EOS_TOKEN

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=spec.data.tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    files = sorted(str(f) for source in spec.data.sources for f in Path(source.path).rglob("*.parquet"))
    text = spec.data.text_field
    docs = load_dataset("parquet", data_files=files, split="train", streaming=True)
    tokens = docs.map(lambda row: {"input_ids": tokenizer(row[text])["input_ids"] + [eos]},
                      remove_columns=[text])
    seq = spec.data.seq_len

    class Windows(torch.utils.data.IterableDataset):
        def __iter__(self):
            buffer: list[int] = []
            for row in tokens:
                buffer.extend(row["input_ids"])
                while len(buffer) > seq:
                    window = torch.tensor(buffer[: seq + 1])
                    del buffer[:seq]
                    yield {"input_ids": window[:-1], "labels": window[1:]}

    return iter(torch.utils.data.DataLoader(Windows(), batch_size=spec.trainer.micro_batch_size))


def measure(make, spec, batches: int) -> dict:
    """Seconds to the first batch (opening files, starting loader workers), then tokens/s of `batches`
    batches after as many warm-up batches: the rate that has to keep up with training. Why the warm-up:
    building the first batch tokenizes a whole `tokenize_batch` of documents per stream, and the next
    hundred or so batches are cut from those tokens without new tokenization (measured from the first
    batch, 150 batches of the demo read 2.3× faster than the steady state)."""
    start = time.perf_counter()
    stream = make(spec)
    next(stream)
    first = time.perf_counter()
    for _ in range(batches):
        next(stream)
    warm = time.perf_counter()
    tokens = sum(next(stream)["input_ids"].numel() for _ in range(batches))
    return {"first_batch_s": first - start, "tokens_per_s": tokens / (time.perf_counter() - warm)}


def main(config: str, batches: int, repeats: int) -> dict:
    from trainer.spec import load_spec

    spec = load_spec(config, ["cluster.workers=1"])
    makers = {"zeroray": zeroray_batches, "naive": naive_batches}
    runs: dict[str, list[dict]] = {name: [] for name in makers}
    for i in range(repeats):
        for name in (list(makers) if i % 2 == 0 else list(makers)[::-1]):
            runs[name].append(measure(makers[name], spec, batches))
    return {"batches": batches, "tokens_per_batch": spec.trainer.micro_batch_size * spec.data.seq_len,
            "loader_workers": spec.data.loader_workers, "runs": runs,
            **{f"{name}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[name])
               for name in makers}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
