"""What a logical stream has read, per source, and the bad-data policy (`data.bad_data`).

Counts live in each stream's saved state, so they are cumulative over the run: a resume, on any
worker count, continues them, and the union of the workers' states holds every stream's counts.
A record is one row of a source: a document (its tokens are counted, end-of-document token
included, so the sources' tokens add up to the tokens packed) or an unusable record, counted by
kind: the readers' kinds (`data_pipelines.sources.BAD_KINDS`) and `empty_document`.
"""

from __future__ import annotations

from collections.abc import Iterable

from data_pipelines.config import DataConfig
from data_pipelines.sources import BAD_KINDS, SourceError

EMPTY_DOCUMENT = "empty_document"
KINDS = (*BAD_KINDS, EMPTY_DOCUMENT)


class BadDataError(SourceError):
    """A logical stream read more unusable records than `data.bad_data` allows; the message says which."""


class RecordCounts:
    """One logical stream's records, per source (by index in data.sources)."""

    def __init__(self, sources: int):
        self.documents = [0] * sources
        self.tokens = [0] * sources
        self.bad: list[dict[str, int]] = [{} for _ in range(sources)]

    @property
    def records(self) -> int:
        return sum(self.documents) + self.bad_records

    @property
    def bad_records(self) -> int:
        return sum(n for per_kind in self.bad for n in per_kind.values())

    def add_document(self, source: int, tokens: int) -> None:
        self.documents[source] += 1
        self.tokens[source] += tokens

    def add_bad(self, source: int, kind: str) -> None:
        self.bad[source][kind] = self.bad[source].get(kind, 0) + 1

    def state_dict(self) -> dict:
        return {"documents": list(self.documents), "tokens": list(self.tokens), "bad": [dict(b) for b in self.bad]}

    def load_state_dict(self, state: dict) -> None:
        self.documents = list(state["documents"])
        self.tokens = list(state["tokens"])
        self.bad = [dict(b) for b in state["bad"]]


def check_bad_data(cfg: DataConfig, stream: int, counts: RecordCounts, source: int, kind: str) -> None:
    """Raise BadDataError when the record just counted (`kind` from `source`) breaks data.bad_data."""
    policy = cfg.bad_data
    where = f"source {cfg.sources[source].label!r} ({cfg.sources[source].path})"
    if policy.policy == "fail":
        raise BadDataError(
            f"data: {where} holds an unusable record ({kind}{_file_hint(kind)}), read by logical stream {stream} "
            f"of {cfg.streams}, and data.bad_data.policy is 'fail'. Fix the record, or set data.bad_data.policy="
            f"skip to skip and count such records (up to data.bad_data.max_fraction)"
        )
    records, bad = counts.records, counts.bad_records
    if records >= policy.min_records and bad > policy.max_fraction * records:
        raise BadDataError(
            f"data: logical stream {stream} of {cfg.streams} read {bad} unusable record(s) out of {records} "
            f"({bad / records:.1%}), more than data.bad_data.max_fraction ({policy.max_fraction:.1%}): "
            f"{_breakdown(cfg, counts)}. Fix or remove those records (`zeroray data inspect` counts them per "
            f"source), or raise data.bad_data.max_fraction if such a share is expected"
        )


def _file_hint(kind: str) -> str:
    return ": the log names the file" if kind == "unreadable_file" else ""


def _breakdown(cfg: DataConfig, counts: RecordCounts) -> str:
    parts = []
    for src, per_kind in zip(cfg.sources, counts.bad, strict=True):
        if per_kind:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(per_kind.items()))
            parts.append(f"source {src.label!r} ({src.path}): {kinds}")
    return "; ".join(parts)


def metrics(cfg: DataConfig, counts: Iterable[RecordCounts]) -> dict[str, float]:
    """`data/documents`, `data/tokens/<source>`, `data/bad/<kind>` summed over `counts`. Every source and
    every kind is present (zero or not), so all ranks report the same keys and a sum over ranks lines up."""
    documents = 0
    tokens = dict.fromkeys((s.label for s in cfg.sources), 0)
    bad = dict.fromkeys(KINDS, 0)
    for c in counts:
        documents += sum(c.documents)
        for src, n in zip(cfg.sources, c.tokens, strict=True):
            tokens[src.label] += n
        for per_kind in c.bad:
            for kind, n in per_kind.items():
                bad[kind] = bad.get(kind, 0) + n
    return {
        "data/documents": float(documents),
        **{f"data/tokens/{name}": float(n) for name, n in tokens.items()},
        **{f"data/bad/{kind}": float(n) for kind, n in bad.items()},
    }
