"""codistill: codistillation (online distillation) for PyTorch and torch.distributed."""

from .codistiller import Codistiller
from .config import ConfigError, RunConfig, load_config
from .data import ReplicaSampler, shard_dataset
from .exchange import DirectoryExchange, Exchange, MemoryExchange, make_exchange
from .losses import AlphaSchedule, distill_loss, predict_probs, task_loss
from .teachers import Teacher, average_predictions

__version__ = "0.1.0"

__all__ = [
    "AlphaSchedule",
    "Codistiller",
    "ConfigError",
    "DirectoryExchange",
    "Exchange",
    "MemoryExchange",
    "ReplicaSampler",
    "RunConfig",
    "Teacher",
    "average_predictions",
    "distill_loss",
    "load_config",
    "make_exchange",
    "predict_probs",
    "shard_dataset",
    "task_loss",
]
