"""Datasets that ship with packages, and sharding across replicas and workers."""

from .linux import ByteCorpus, build_corpus, install_linux, linux_dir
from .sharding import (
    ReplicaSampler,
    ShardSampler,
    StreamSampler,
    replica_indices,
    shard_dataset,
    shard_indices,
    stream_shard,
)
from .text import TextCorpus, build_text_corpus, kjv_path, load_text

__all__ = ["ByteCorpus", "ReplicaSampler", "ShardSampler", "StreamSampler", "TextCorpus", "build_corpus",
           "build_text_corpus", "install_linux", "kjv_path", "linux_dir", "load_text", "replica_indices",
           "shard_dataset", "shard_indices", "stream_shard"]
