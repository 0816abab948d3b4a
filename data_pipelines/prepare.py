"""`zeroray data prepare`: parquet shards + a byte-level BPE tokenizer from a folder of text files.

The default folder is the running interpreter's standard-library source: real text that exists
on every machine that runs zeroray, so the demo needs no download.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.tokenizer import EOS_TOKEN

DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
# Vendored third-party code and generated test data are not the standard library's own text.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def default_source() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class PrepareReport:
    out_dir: Path
    train_docs: int
    val_docs: int
    train_bytes: int
    shards: int
    vocab_size: int

    def lines(self) -> list[str]:
        return [
            f"wrote {self.train_docs} training documents ({self.train_bytes / 1e6:.1f} MB) in {self.shards} "
            f"parquet shards to {self.out_dir / 'train'}",
            f"wrote {self.val_docs} held-out documents to {self.out_dir / 'val'}",
            f"trained a byte-level BPE tokenizer ({self.vocab_size} tokens): {self.out_dir / 'tokenizer.json'}",
        ]


def _documents(source: Path, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part in SKIP_DIRS for part in rel.parts) or path.suffix not in extensions or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files are not training text
        if text.strip():
            docs.append((str(rel), text))
    return docs


def _is_validation(rel_path: str, fraction: float) -> bool:
    # Hash of the path, not a random draw: the split is the same on every machine and every run.
    digest = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def _write_shards(docs: list[tuple[str, str]], folder: Path, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = docs[i::shards]
        table = pa.table({"text": [t for _, t in part], "path": [p for p, _ in part]})
        pq.write_table(table, folder / f"shard-{i:05d}.parquet")


def train_tokenizer(texts: list[str], vocab_size: int, out_file: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))
    return tok.get_vocab_size()


def prepare(
    out_dir: Path,
    source: Path | None = None,
    shards: int = 8,
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
) -> PrepareReport:
    source = source or default_source()
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder; pass a folder of text files")
    docs = _documents(source, extensions)
    if not docs:
        raise ValueError(
            f"--source {source} has no non-empty files with extensions {', '.join(extensions)}; "
            f"pass another folder or --extensions"
        )
    train = [d for d in docs if not _is_validation(d[0], val_fraction)]
    val = [d for d in docs if _is_validation(d[0], val_fraction)] or train[-1:]
    if len(train) < shards:
        raise ValueError(f"--shards {shards} is more than the {len(train)} training documents; use fewer shards")
    _write_shards(train, out_dir / "train", shards)
    _write_shards(val, out_dir / "val", 1)
    vocab = train_tokenizer([t for _, t in train], vocab_size, out_dir / "tokenizer.json")
    report = PrepareReport(out_dir, len(train), len(val), sum(len(t) for _, t in train), shards, vocab)
    (out_dir / "prepare.json").write_text(
        json.dumps({"source": str(source), **{k: str(v) for k, v in report.__dict__.items()}}, indent=2) + "\n"
    )
    return report
