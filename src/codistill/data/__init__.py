"""Datasets that ship with packages, and sharding across replicas and workers."""

from .sharding import ReplicaSampler, ShardSampler, replica_indices, shard_dataset, shard_indices
from .text import TextCorpus, build_text_corpus, kjv_path, load_text

__all__ = ["ReplicaSampler", "ShardSampler", "TextCorpus", "build_text_corpus", "kjv_path", "load_text",
           "replica_indices", "shard_dataset", "shard_indices"]
