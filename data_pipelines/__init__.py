"""Streaming data: sources → on-the-fly tokenization → packing (and shuffling) → logical streams dealt
to ranks and to their loader workers, with exact resume on any world size and record accounting."""

from data_pipelines.accounting import BadDataError
from data_pipelines.config import DataConfig, LayoutError, SourceConfig
from data_pipelines.sources import SourceError
from data_pipelines.stream import BatchStream, EmptyDataError, StreamStateError, merge_states

__all__ = ["BadDataError", "BatchStream", "DataConfig", "EmptyDataError", "LayoutError", "SourceConfig",
           "SourceError", "StreamStateError", "merge_states"]
