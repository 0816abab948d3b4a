"""Streaming data: sources → on-the-fly tokenization → packing → per-rank batches with exact resume."""

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.sources import SourceError
from data_pipelines.stream import BatchStream, EmptyDataError

__all__ = ["BatchStream", "DataConfig", "EmptyDataError", "SourceConfig", "SourceError"]
