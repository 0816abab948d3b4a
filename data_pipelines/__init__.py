"""Streaming data: sources → on-the-fly tokenization → packing → logical streams dealt to ranks,
with exact resume on any world size."""

from data_pipelines.config import DataConfig, LayoutError, SourceConfig
from data_pipelines.sources import SourceError
from data_pipelines.stream import BatchStream, EmptyDataError, StreamStateError, merge_states

__all__ = ["BatchStream", "DataConfig", "EmptyDataError", "LayoutError", "SourceConfig", "SourceError",
           "StreamStateError", "merge_states"]
