from __future__ import annotations

import gc

import numpy as np
import pytest

from distml.config import DataConfig, LoaderConfig
from distml.data.dataset import read_partition
from distml.data.ingest import ingest
from distml.data.loader import PartitionLoader, plan_epoch
from distml.errors import DataError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """1,200 rows in uneven partitions (70/15/15 split of 1,714 rows, 7 chunks of 250)."""
    data = DataConfig.model_validate({
        "source": {"type": "synthetic:classification", "n_samples": 1714, "n_features": 3,
                   "n_classes": 3},
        "rows_per_partition": 250, "stratify": False,
    })
    return ingest(data, tmp_path_factory.mktemp("d") / "data", seed=0)


def _epoch(manifest, *, epoch=0, start=0, rank=0, world=1, batch=32, **cfg):
    loader = PartitionLoader(manifest, "train", batch_size=batch, seed=3, rank=rank,
                             world_size=world, config=LoaderConfig(**cfg))
    return loader, [(x.numpy(), y.numpy()) for x, y in loader.batches(epoch, start)]


def _row_ids(manifest, batches):
    """Identify rows by their features (float32 triples are unique here)."""
    return [tuple(r) for x, _ in batches for r in x]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks(manifest, world):
    n = manifest.rows("train")
    assert n % 6 == 0  # divisible by 1, 2 and 3: no remainder to drop or pad
    seen = []
    for rank in range(world):
        loader, batches = _epoch(manifest, rank=rank, world=world, shuffle_window=100)
        assert len(batches) == len(loader)
        seen += _row_ids(manifest, batches)
    assert len(seen) == len(set(seen)) == n


def test_remainder_drop_and_pad():
    sizes = [5, 3, 4]  # 12 rows, 5 ranks
    plans = {r: [plan_epoch(sizes, epoch=0, seed=0, rank=k, world_size=5, shuffle=True,
                            remainder=r, window_rows=4) for k in range(5)] for r in ("drop", "pad")}
    rows = {r: [(p, i) for rank in plan for w in rank for p, a, b in w.segments
                for i in range(a, b)] for r, plan in plans.items()}
    assert len(rows["drop"]) == 10
    assert len(set(rows["drop"])) == 10
    assert len(rows["pad"]) == 15
    assert len(set(rows["pad"])) == 12
    assert all(sum(w.rows for w in rank) == 3 for rank in plans["pad"])


def test_resume_mid_epoch_yields_exactly_the_rest(manifest):
    _, full = _epoch(manifest, epoch=2, shuffle_window=100)
    _, rest = _epoch(manifest, epoch=2, start=7, shuffle_window=100)
    assert len(rest) == len(full) - 7
    for (xa, ya), (xb, yb) in zip(full[7:], rest, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("cfg", [
    {"num_threads": 1, "prefetch_batches": 0, "cache": "none"},
    {"num_threads": 4, "prefetch_batches": 2, "cache": "disk"},
    {"num_threads": 2, "prefetch_batches": 8, "cache": "memory"},
])
def test_batches_do_not_depend_on_threads_prefetch_or_cache(manifest, cfg):
    _, reference = _epoch(manifest, epoch=1)
    _, batches = _epoch(manifest, epoch=1, **cfg)
    assert len(batches) == len(reference)
    for (xa, ya), (xb, yb) in zip(reference, batches, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_shuffle_changes_order_between_epochs_and_can_be_off(manifest):
    _, e0 = _epoch(manifest, epoch=0)
    _, e1 = _epoch(manifest, epoch=1)
    _, plain = _epoch(manifest, shuffle=False)
    assert _row_ids(manifest, e0) != _row_ids(manifest, e1)
    assert sorted(_row_ids(manifest, e0)) == sorted(_row_ids(manifest, e1))
    in_order = np.concatenate([x for x, _ in plain])
    first = manifest.partitions("train")[0]
    x0, _ = read_partition(manifest, first["path"])
    np.testing.assert_array_equal(in_order[: len(x0)], x0)


def test_map_fn_runs_on_every_batch(manifest, tmp_path, monkeypatch):
    (tmp_path / "maps.py").write_text(
        "def double(x, y):\n    return x * 2, y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, plain = _epoch(manifest)
    _, mapped = _epoch(manifest, map_fn="maps:double")
    np.testing.assert_array_equal(mapped[3][0], plain[3][0] * 2)


def test_a_corrupt_partition_fails_in_the_consumer_with_its_name(tmp_path):
    data = DataConfig.model_validate({"source": "sklearn:digits", "rows_per_partition": 300})
    m = ingest(data, tmp_path / "d", seed=0)
    rel = m.partitions("train")[2]["path"]
    (tmp_path / "d" / rel).write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=rf"partition .*{rel} is unreadable"):
        _epoch(m, shuffle=False, prefetch_batches=4)


def test_disk_cache_is_removed_with_the_loader(manifest):
    loader, _ = _epoch(manifest, cache="disk")
    folder = loader._disk_cache
    assert any(folder.glob("*.x.npy"))
    del loader
    gc.collect()
    assert not folder.exists()


def test_a_window_is_its_rows_in_plan_order_permuted_by_its_seed(manifest):
    # The plan is the contract (a resumed run relies on it): window w's row k is row perm[k]
    # of its segments laid end to end, perm drawn from the window's seed, whether the window
    # lies in one partition or spans several.
    loader, batches = _epoch(manifest, epoch=1, batch=25, shuffle_window=100)
    parts = [read_partition(manifest, p["path"]) for p in manifest.partitions("train")]
    plan = loader.plan(1)
    assert any(len(w.segments) > 1 for w in plan)
    assert any(len(w.segments) == 1 for w in plan)
    expected = []
    for w in plan:
        rows = np.concatenate([parts[pid][0][a:b] for pid, a, b in w.segments])
        expected.append(rows[np.random.default_rng(w.seed).permutation(w.rows)])
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]),
                                  np.concatenate(expected))
