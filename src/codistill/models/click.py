"""Click model: field embeddings + numeric features → MLP (optionally with DCN cross layers)
→ one click logit per row."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def code_range_error(lows: Sequence[int], highs: Sequence[int], cardinalities: Sequence[int],
                     names: Sequence[str] | None = None) -> str | None:
    """What is wrong with categorical codes whose per-field extremes are ``lows`` and
    ``highs``: the first field (its name, if ``names``) with a code outside
    ``[0, cardinality)``, that code and the limit; None if every field is within range."""
    for f, (lo, hi, card) in enumerate(zip(lows, highs, cardinalities)):
        if lo < 0 or hi >= card:
            field = f"field {f} ({names[f]!r})" if names else f"field {f}"
            return (f"{field} has code {int(lo if lo < 0 else hi)}, outside [0, {int(card)}) "
                    f"(cardinalities {[int(c) for c in cardinalities]})")
    return None


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
    the numeric features alone (``categorical`` may then be ``[B, 0]`` or None).

    ``validate_inputs`` (on by default): :meth:`forward` first checks its inputs with
    :meth:`check_inputs`, whose range check of the codes costs a host synchronisation per call
    (a code past its field's cardinality would otherwise silently index the next field's
    embeddings). :class:`~codistill.tasks.click.ClickTask` checks its data against the
    model's field sizes once, when it builds the model, and turns it off."""

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
        self.validate_inputs = True
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

    def check_inputs(self, categorical: torch.Tensor | None, numeric: torch.Tensor | None = None) -> None:
        """ValueError unless ``(categorical, numeric)`` fit this model: integer codes ``[B, F]``
        (None or ``[B, 0]`` without fields), each within its field's cardinality, and numeric
        features ``[B, D]`` (None without any). The range check reads the codes' extremes on the
        host: a device synchronisation. :meth:`forward` calls this while ``validate_inputs`` is
        on; a caller whose data was checked once (e.g. :class:`~codistill.tasks.click.ClickTask`,
        which checks its codes against the model's field sizes when it builds the model) turns
        it off, keeping every check out of the training loop."""
        f, d = self.num_fields, self.num_numeric
        if categorical is None and not f and numeric is not None and numeric.dim() == 2:
            b = numeric.shape[0]
        else:
            b = self._check_categorical(categorical)
        if numeric is None:
            if d:
                raise ValueError(f"numeric: expected shape [batch, {d}], found None")
            return
        if numeric.dim() != 2 or numeric.shape[1] != d or numeric.shape[0] != b:
            raise ValueError(f"numeric: expected shape [{b}, {d}], found {list(numeric.shape)}")

    def _check_categorical(self, categorical: torch.Tensor | None) -> int:
        """The batch size of integer codes ``[B, F]`` that lie within each field's cardinality."""
        f = self.num_fields
        if categorical is None or categorical.dim() != 2 or categorical.shape[1] != f:
            found = None if categorical is None else list(categorical.shape)
            raise ValueError(f"categorical: expected shape [batch, {f}], found {found}")
        if categorical.is_floating_point() or categorical.is_complex():
            raise ValueError(f"categorical: expected integer codes, found dtype {categorical.dtype}")
        if f and categorical.numel() and ((categorical < 0) | (categorical >= self.limits)).any():
            lows, highs = categorical.amin(0).tolist(), categorical.amax(0).tolist()
            raise ValueError(f"categorical: {code_range_error(lows, highs, self.cardinalities)}")
        return categorical.shape[0]

    def forward(self, categorical: torch.Tensor | None, numeric: torch.Tensor | None = None) -> torch.Tensor:
        if self.validate_inputs:
            self.check_inputs(categorical, numeric)
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
