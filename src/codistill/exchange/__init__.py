"""Exchanges: where replicas publish their weights and read their peers'."""

from __future__ import annotations

from .background import BackgroundExchange
from .base import Exchange, Published, state_nbytes
from .directory import DirectoryExchange
from .memory import MemoryExchange

__all__ = [
    "BackgroundExchange",
    "DirectoryExchange",
    "Exchange",
    "MemoryExchange",
    "Published",
    "make_exchange",
    "state_nbytes",
]


def make_exchange(spec: str | Exchange, keep: int = 3, background: bool = False) -> Exchange:
    """Build an exchange from ``"memory"``, a directory path, ``file://`` or an fsspec URL
    (an :class:`Exchange` is returned as it is). ``background``: a directory or URL is
    written by a :class:`BackgroundExchange` (publishing off the training step)."""
    if isinstance(spec, Exchange):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"exchange must be 'memory', a directory or a URL, got {spec!r}")
    if spec == "collective":
        raise ValueError("exchange 'collective' is set up by the distributed trainer, not make_exchange")
    if spec == "memory":
        return MemoryExchange(keep=keep)
    directory = DirectoryExchange(spec, keep=keep)
    return BackgroundExchange(directory) if background else directory
