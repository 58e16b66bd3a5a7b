"""codistill: codistillation (online distillation) for PyTorch and torch.distributed."""

from .codistiller import Codistiller, CodistillStats
from .config import ConfigError, RunConfig, load_config
from .data import ReplicaSampler, shard_dataset
from .env import replica_seed
from .exchange import DirectoryExchange, Exchange, MemoryExchange, make_exchange
from .exchange.signing import Trust
from .losses import AlphaSchedule, DistillLoss, distill_loss, predict_probs, task_loss
from .picking import BoundedDrift, LockStep, Newest
from .teachers import Teacher, TeacherSpec, average_predictions

__version__ = "0.1.0"

__all__ = [
    "AlphaSchedule",
    "BoundedDrift",
    "CodistillStats",
    "Codistiller",
    "ConfigError",
    "DirectoryExchange",
    "DistillLoss",
    "Exchange",
    "LockStep",
    "MemoryExchange",
    "Newest",
    "ReplicaSampler",
    "RunConfig",
    "Teacher",
    "TeacherSpec",
    "Trust",
    "average_predictions",
    "distill_loss",
    "load_config",
    "make_exchange",
    "predict_probs",
    "replica_seed",
    "shard_dataset",
    "task_loss",
]
