"""Datasets that ship with packages, and sharding across replicas and workers."""

from .sharding import ShardSampler, shard_indices
from .text import TextCorpus, build_text_corpus, kjv_path, load_text

__all__ = ["ShardSampler", "TextCorpus", "build_text_corpus", "kjv_path", "load_text", "shard_indices"]
