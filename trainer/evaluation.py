"""Loss on held-out data (`eval:` in the run spec), measured the same way at every evaluation.

The batches are built once: the held-out sources go through the run's own tokenizer, packing and
objective (`data` with its sources replaced) as one logical stream, and rank r of W takes windows
r, r + W, r + 2W, … of it. So every evaluation scores the same windows, whatever the step, and the
set of windows does not depend on how they are dealt (W ranks together score the first
W × eval.batches × micro_batch_size windows). Every rank runs the same number of forward passes,
which ZeRO-3 needs: each forward gathers parameters from all ranks.

Besides loss and perplexity, bits per byte: the summed token NLL (nats) ÷ (ln 2 × the UTF-8 bytes of the
text the scored tokens stand for). A token's bytes come from the tokenizer (`token_byte_lengths`: 1 per
byte id; for byte-level BPE the bytes of each token's string), the end-of-document token and the
objective's special ids (pad, mask, sentinels) count 0. So a byte-level Charformer and a BPE Llama
compare on one scale: for a byte tokenizer bits per byte is loss / ln 2 over the byte targets.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_pipelines import BatchStream, DataConfig, LayoutError, SourceConfig, SourceError
from data_pipelines.objectives import IGNORE
from data_pipelines.tokenizer import ByteTokenizer, load_tokenizer
from trainer.errors import ZerorayError

if TYPE_CHECKING:
    from trainer.spec import RunSpec



class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[SourceConfig, ...] = Field(
        (),
        description="Held-out data, in the shape of data.sources (e.g. the val/ folder `zeroray data prepare` "
        "writes); it goes through the run's tokenizer and objective. Empty = no evaluation.",
    )
    every: int = Field(0, ge=0, description="Steps between evaluations; 0 = only after the last step.")
    batches: int = Field(
        4, ge=1, description="Micro-batches (trainer.micro_batch_size rows) each rank evaluates; every evaluation "
        "reads the same first windows of the held-out data."
    )
    sample_prompts: tuple[str, ...] = Field(
        (), description="Prompts the model continues at every evaluation (greedy, as `zeroray sample "
        "--temperature 0`; decoder and encoder–decoder models), to watch a run learn: the texts go into the "
        "metrics record (`eval/samples`) and the trackers (TensorBoard text, a W&B table, MLflow artifacts). "
        "Empty = none."
    )
    sample_tokens: int = Field(32, ge=1, le=1024, description="Tokens generated for each of eval.sample_prompts.")

    @model_validator(mode="after")
    def _has_data(self) -> EvalConfig:
        if self.every and not self.sources and not self.sample_prompts:
            raise ValueError(
                f"eval.every={self.every} but eval.sources and eval.sample_prompts are empty: add the held-out "
                f"data, e.g. eval.sources=[{{path: data/stdlib/val}}], or drop eval.every"
            )
        return self

    def due(self, step: int, last: bool) -> bool:
        """Evaluation steps: every `every` steps and after the last one (none without sources or prompts)."""
        return bool(self.sources or self.sample_prompts) and (last or bool(self.every and step % self.every == 0))


def held_out_batches(spec: RunSpec, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's eval micro-batches, on the CPU. Raises ZerorayError naming eval.sources when the
    held-out data cannot be read."""
    micro = spec.trainer.micro_batch_size
    where = ", ".join(s.path for s in spec.eval.sources)
    try:
        # The first windows in file order (no shuffle), read in this process: a few batches, once.
        cfg = DataConfig.model_validate({**spec.data.model_dump(), "sources": [s.model_dump() for s in spec.eval.sources],
                                         "streams": 1, "shuffle_buffer": 0, "loader_workers": 0})
        windows = BatchStream(cfg, micro_batch=1)  # one window per item, in the stream's order
        rows = [next(windows) for _ in range(world * spec.eval.batches * micro)][rank::world]
    except (SourceError, LayoutError, FileNotFoundError, ValidationError) as exc:
        raise ZerorayError(f"eval.sources: {exc}") from None
    except Exception as exc:  # pyarrow / datasets / fsspec errors on damaged or empty files
        raise ZerorayError(
            f"eval.sources: reading the held-out data from {where} failed with {type(exc).__name__}: {exc}. "
            f"Check the files (e.g. rebuild them with `zeroray data prepare`), or drop eval.sources"
        ) from None
    return [
        {k: torch.cat([r[k] for r in rows[i : i + micro]]) for k in rows[0]} for i in range(0, len(rows), micro)
    ]


def token_byte_lengths(tokenizer_spec: str, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each id of a `vocab_size` vocabulary stands for (int64 [vocab_size]): ids past the
    tokenizer's own vocabulary (the objective's pad, mask, sentinels) and its special tokens are 0.

    Byte tokenizer: 1 per byte id. Byte-level BPE (what `zeroray data prepare` trains): a token's string is
    one alphabet character per byte, so its length is its byte count, exactly, and the lengths of a text's
    tokens sum to the text's bytes. Another `tokenizers` model: the bytes of each token decoded alone (a
    token holding part of a character counts the replacement character instead: approximate)."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    tokenizer = load_tokenizer(tokenizer_spec)
    if isinstance(tokenizer, ByteTokenizer):
        lengths[: min(256, vocab_size)] = 1
        return lengths
    from tokenizers import Tokenizer, decoders

    tok = Tokenizer.from_file(tokenizer.path)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    # The decoder object, not the tokenizer's JSON: serialising and parsing an 8k-token BPE costs ~0.5 s a rank.
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    ids, counts = [], []
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size or token in special:
            continue
        ids.append(i)
        counts.append(len(token) if byte_level else len(tok.decode([i], skip_special_tokens=False).encode("utf-8")))
    lengths[torch.tensor(ids, dtype=torch.long)] = torch.tensor(counts, dtype=torch.long)
    return lengths


def target_bytes(labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bytes of the text the labelled positions (labels != −100) stand for."""
    kept = labels[labels != IGNORE]
    return lengths.to(kept.device)[kept].sum()


def bits_per_byte(nll_sum: float, n_bytes: float) -> float | None:
    """Summed NLL in nats over the bytes those tokens cover, in bits (None without bytes)."""
    return nll_sum / (math.log(2) * n_bytes) if n_bytes else None


def objective_sum(out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed objective loss, labelled positions) of one forward pass: the objective alone, as the training
    record's `loss` (aux losses are not held-out quality); the model's loss is a mean over the labelled
    positions, so it is weighted by their count."""
    objective = out.loss.double() - sum(v.double() for v in (out.aux_losses or {}).values())
    labelled = (batch["labels"] != IGNORE).sum().double()
    return objective * labelled, labelled


def corpus_metrics(module: torch.nn.Module, spec: RunSpec, path: str, batch_size: int = 8,
                   max_windows: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of `module` on a corpus (`path`: a file, folder, glob or URL, as in
    data.sources), through the run's own tokenizer, packing and objective: every window of one pass over the
    corpus in file order (the window that runs over the end into a second pass is left out), or the first
    `max_windows`."""
    try:
        cfg = DataConfig.model_validate({**spec.data.model_dump(), "sources": [{"path": path}], "streams": 1,
                                         "shuffle_buffer": 0, "loader_workers": 0})
        windows = BatchStream(cfg, micro_batch=1)
    except (SourceError, LayoutError, FileNotFoundError, ValidationError, ValueError) as exc:
        raise ZerorayError(f"--data {path}: {exc}") from None
    lengths = token_byte_lengths(spec.data.tokenizer, spec.model.vocab_size)
    nll = labelled = n_bytes = 0.0
    taken, pending = 0, []

    def score(rows: list[dict]) -> None:
        nonlocal nll, labelled, n_bytes
        batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        with torch.no_grad():
            s, n = objective_sum(module(**batch), batch)
        nll, labelled, n_bytes = nll + float(s), labelled + float(n), n_bytes + float(target_bytes(batch["labels"], lengths))

    while max_windows is None or taken < max_windows:
        try:
            row = next(windows)
        except Exception as exc:  # pyarrow / datasets / fsspec errors on damaged files
            raise ZerorayError(f"--data {path}: reading it failed with {type(exc).__name__}: {exc}") from None
        if windows.state_dict()["streams"]["0"]["epoch"] > 0:
            break  # this window reaches into a second pass
        pending.append(row)
        taken += 1
        if len(pending) == batch_size:
            score(pending)
            pending = []
    if pending:
        score(pending)
    if not taken:
        raise ZerorayError(f"--data {path} holds less than one window of data.seq_len={spec.data.seq_len} tokens")
    loss = nll / labelled
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": bits_per_byte(nll, n_bytes), "tokens": int(labelled), "bytes": int(n_bytes),
            "windows": taken, "nll_sum": nll}


class Evaluator:
    def __init__(self, spec: RunSpec, rank: int, world: int, device: torch.device):
        # A few small tensors: kept on the device for the life of the run.
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in held_out_batches(spec, rank, world)]
        # The batches are the same at every evaluation: their bytes are counted once.
        lengths = token_byte_lengths(spec.data.tokenizer, spec.model.vocab_size)
        self.bytes = float(sum(target_bytes(b["labels"].cpu(), lengths) for b in self.batches))

    def sums(self, engine) -> dict[str, torch.Tensor]:
        """This rank's token-weighted loss sum and token count (to be summed over ranks: `metrics`).

        Through the DeepSpeed engine, not the bare module: under ZeRO-3 the engine's hooks gather
        each layer's parameters for the forward pass."""
        device = self.batches[0]["input_ids"].device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        tokens = torch.zeros((), device=device, dtype=torch.float64)
        engine.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    nll, labelled = objective_sum(engine(**batch), batch)
                    loss_sum += nll
                    tokens += labelled
        finally:
            engine.train()
        return {"eval/loss_sum": loss_sum, "eval/tokens": tokens,
                "eval/bytes": torch.tensor(self.bytes, device=device, dtype=torch.float64)}

    @staticmethod
    def metrics(summed: dict[str, float]) -> dict[str, float]:
        """eval/loss, eval/perplexity and eval/bits_per_byte from the sums of every rank's `sums`."""
        loss = summed["eval/loss_sum"] / summed["eval/tokens"]
        out = {"eval/loss": loss, "eval/perplexity": math.exp(loss) if loss < 700 else math.inf}
        bpb = bits_per_byte(summed["eval/loss_sum"], summed.get("eval/bytes", 0.0))
        return out if bpb is None else {**out, "eval/bits_per_byte": bpb}
