"""Tokenizers the pipeline understands: raw UTF-8 bytes, or a `tokenizers` JSON file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes 0–255 are their own ids; 256 ends a document. Used by byte-level models and smoke tests."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A trained `tokenizers` tokenizer; its end-of-document token is `<|endoftext|>`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(path)
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer {path} has no {EOS_TOKEN!r} token; retrain it with `zeroray data prepare`")
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust tokenizer encodes the batch on several threads.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str) -> ByteTokenizer | FileTokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"data.tokenizer: {spec!r} is not a file. Use 'bytes', or build one with `zeroray data prepare`."
        )
    return FileTokenizer(spec)
