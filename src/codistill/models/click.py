"""Click model: field embeddings + numeric features → MLP (optionally with DCN cross layers)
→ one click logit per row."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x_{l+1} = x_0 * (W x_l + b) + x_l``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=dim ** -0.5 * 0.1)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class ClickModel(nn.Module):
    """Embedding per categorical field, concatenated with the numeric features, into a ReLU
    MLP; with ``cross_layers > 0`` a DCN cross network on the same input, whose output joins
    the MLP's last hidden layer before the final linear. ``forward(categorical, numeric)``
    returns logits ``[B]``. Without categorical fields there is no embedding: the MLP reads
    the numeric features alone (``categorical`` may then be ``[B, 0]`` or None)."""

    def __init__(self, cardinalities: list[int], num_numeric: int, embed_dim: int = 8,
                 hidden: list[int] | None = None, cross_layers: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must all be >= 1, got {cards}")
        if num_numeric < 0 or embed_dim < 1 or cross_layers < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError("need num_numeric >= 0, embed_dim >= 1, cross_layers >= 0, 0 <= dropout < 1")
        if not cards and num_numeric == 0:
            raise ValueError("ClickModel needs at least one categorical field or numeric feature")
        hidden = [64, 32] if hidden is None else [int(h) for h in hidden]
        self.cardinalities, self.num_numeric, self.embed_dim = cards, int(num_numeric), int(embed_dim)
        self.num_fields = len(cards)
        # One table for all fields; field f's codes are offset by the sizes of the fields before it.
        offsets = torch.tensor([0] + cards[:-1], dtype=torch.long).cumsum(0) if cards else torch.zeros(0)
        self.register_buffer("offsets", offsets.long(), persistent=False)
        self.register_buffer("limits", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.embedding = nn.Embedding(sum(cards), embed_dim) if cards else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.05)
        in_dim = self.num_fields * embed_dim + self.num_numeric
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        self.mlp = nn.Sequential(*layers)
        self.cross = nn.ModuleList(CrossLayer(in_dim) for _ in range(cross_layers))
        self.head = nn.Linear(prev + (in_dim if cross_layers else 0), 1)

    def _check(self, categorical: torch.Tensor | None, numeric: torch.Tensor | None) -> torch.Tensor:
        """``numeric`` (zeros ``[B, 0]`` for None) once both inputs have the expected shapes."""
        f, d = self.num_fields, self.num_numeric
        if categorical is None and not f and numeric is not None and numeric.dim() == 2:
            b = numeric.shape[0]
        else:
            b = self._check_categorical(categorical)
        if numeric is None:
            if d:
                raise ValueError(f"numeric: expected shape [batch, {d}], found None")
            return torch.zeros((b, 0), dtype=self.head.weight.dtype, device=self.head.weight.device)
        if numeric.dim() != 2 or numeric.shape[1] != d or numeric.shape[0] != b:
            raise ValueError(f"numeric: expected shape [{b}, {d}], found {list(numeric.shape)}")
        return numeric

    def _check_categorical(self, categorical: torch.Tensor | None) -> int:
        """The batch size of integer codes ``[B, F]`` that lie within each field's cardinality."""
        f = self.num_fields
        if categorical is None or categorical.dim() != 2 or categorical.shape[1] != f:
            found = None if categorical is None else list(categorical.shape)
            raise ValueError(f"categorical: expected shape [batch, {f}], found {found}")
        if categorical.is_floating_point() or categorical.is_complex():
            raise ValueError(f"categorical: expected integer codes, found dtype {categorical.dtype}")
        if f and categorical.numel() and ((categorical < 0) | (categorical >= self.limits)).any():
            raise ValueError(f"categorical: codes must lie in [0, cardinality) per field, "
                             f"cardinalities {self.cardinalities}")
        return categorical.shape[0]

    def forward(self, categorical: torch.Tensor | None, numeric: torch.Tensor | None = None) -> torch.Tensor:
        numeric = self._check(categorical, numeric)
        parts = []
        if self.embedding is not None and categorical is not None:
            emb = self.embedding(categorical.long() + self.offsets)  # [B, F, E]
            parts.append(emb.flatten(1))
        if self.num_numeric:
            parts.append(numeric.to(self.head.weight.dtype))
        x0 = torch.cat(parts, dim=1)
        h = self.mlp(x0)
        if self.cross:
            x = x0
            for layer in self.cross:
                x = layer(x0, x)
            h = torch.cat([h, x], dim=1)
        return self.head(h).squeeze(-1)


__all__ = ["ClickModel", "CrossLayer"]
