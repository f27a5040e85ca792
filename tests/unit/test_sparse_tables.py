"""Sharded sparse embedding tables in one process: deterministic rows, the row-wise sparse
optimizers, a ClickModel trained through the row stores against the same model holding
its tables whole (nn.EmbeddingBag(sparse=True)), and a store's checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from distml.distributed.param_server import checkpoint as ckpt
from distml.distributed.param_server.protocol import Channel
from distml.distributed.param_server.sparse import (
    RowPartition,
    RowStore,
    SparseClient,
    TableHost,
    init_rows,
)
from distml.models.click import ClickModel, tables_elsewhere

CARDS, DIM, SEED, SCALE = [5000, 300], 8, 3, 0.05


def _full_table(table: int, rows: int) -> torch.Tensor:
    return init_rows(torch.arange(rows), DIM, seed=SEED, table=table, scale=SCALE)


def test_rows_depend_only_on_their_id():
    ids = torch.tensor([7, 123456, 2, 7])
    rows = init_rows(ids, DIM, seed=SEED, table=0, scale=SCALE)
    assert torch.equal(rows[0], rows[3])
    alone = init_rows(torch.tensor([123456]), DIM, seed=SEED, table=0, scale=SCALE)
    assert torch.equal(rows[1], alone[0])
    assert not torch.equal(rows[1], init_rows(torch.tensor([123456]), DIM, seed=SEED,
                                              table=1, scale=SCALE)[0])
    assert rows.abs().max() <= SCALE
    big = _full_table(0, 20000)
    assert abs(big.mean().item()) < 1e-3  # uniform, centred
    assert big.std().item() == pytest.approx(SCALE / 3 ** 0.5, rel=0.02)


@pytest.mark.parametrize("how", ["hash", "range"])
def test_every_row_has_one_owner(how):
    part = RowPartition(1000, 3, how)
    ids = torch.arange(1000)
    owners = sorted(torch.cat(part.split(ids)).tolist())
    assert owners == list(range(1000))
    assert set(part.owner(ids).tolist()) == {0, 1, 2}


def test_row_wise_adagrad_keeps_one_accumulator_per_row():
    store = RowStore(2, table=0, seed=SEED, scale=SCALE, optimizer="adagrad", lr=0.5)
    before = store.get(torch.tensor([4, 9])).clone()
    g = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    store.apply(torch.tensor([4, 9]), g)
    acc = g.pow(2).mean(dim=1, keepdim=True)
    assert torch.allclose(store.get(torch.tensor([4, 9])), before - 0.5 * g / acc.sqrt())
    assert store.state.shape == (2, 1)


def _batches(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Power-law ids: a few rows touched often, most rarely or never."""
    out = []
    for _ in range(n):
        dense = torch.randn(64, 3, generator=gen)
        ids = [(torch.rand(64, generator=gen) ** 3 * c).long().clamp_(max=c - 1)
               for c in CARDS]
        out.append(torch.cat([dense, *[i[:, None].float() for i in ids]], dim=1))
    return out


def test_lazy_adam_is_sparse_adam_on_one_store():
    gen = torch.Generator().manual_seed(0)
    bag = nn.EmbeddingBag(CARDS[0], DIM, mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(_full_table(0, CARDS[0]))
    ref = torch.optim.SparseAdam(bag.parameters(), lr=0.01)
    store = RowStore(DIM, table=0, seed=SEED, scale=SCALE, optimizer="adam", lr=0.01)
    for _ in range(5):
        ids = (torch.rand(50, generator=gen) ** 3 * CARDS[0]).long()
        target = torch.randn(50, DIM, generator=gen)
        ref.zero_grad()
        ((bag(ids[:, None]) - target) ** 2).sum().backward()
        ref.step()
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = store.get(uniq).requires_grad_(True)
        ((rows[inv] - target) ** 2).sum().backward()
        store.apply(uniq, rows.grad)
    held = store.ids
    assert torch.allclose(store.get(held), bag.weight.detach()[held], atol=1e-6)
    assert len(store) < CARDS[0] // 4  # only the rows touched


def _pair(optimizer: str, how: str):
    torch.manual_seed(0)
    whole = ClickModel(num_dense=3, cardinalities=CARDS, dim=DIM, hidden_sizes=[16])
    with torch.no_grad():
        for t, bag in enumerate(whole.bags):
            bag.weight.copy_(_full_table(t, CARDS[t]))
    torch.manual_seed(0)
    sharded = ClickModel(num_dense=3, cardinalities=CARDS, dim=DIM, hidden_sizes=[16])
    stores = [[RowStore(DIM, table=t, seed=SEED, scale=SCALE, optimizer=optimizer, lr=0.01)
               for t in range(len(CARDS))] for _ in range(2)]
    parts = [RowPartition(c, 2, how) for c in CARDS]
    client = SparseClient(sharded, parts,
                          fetch=lambda s, t, ids: stores[s][t].get(ids),
                          push=lambda s, t, ids, g: stores[s][t].apply(ids, g))
    return whole, sharded, stores, client


@pytest.mark.parametrize("how", ["hash", "range"])
def test_a_click_model_trains_the_same_through_sharded_stores(how):
    whole, sharded, stores, client = _pair("adam", how)
    opt_w = [torch.optim.SparseAdam(whole.bags.parameters(), lr=0.01),
             torch.optim.Adam(whole.top.parameters(), lr=0.01)]
    opt_s = torch.optim.Adam(sharded.top.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    for x in _batches(8, torch.Generator().manual_seed(1)):
        y = (x[:, 0] > 0).float()[:, None]
        for o in opt_w:
            o.zero_grad()
        loss_fn(whole(x), y).backward()
        for o in opt_w:
            o.step()
        opt_s.zero_grad()
        client.prepare(x)
        loss_fn(sharded(x), y).backward()
        opt_s.step()
        client.push()
    for t in range(len(CARDS)):
        for store in (stores[0][t], stores[1][t]):
            w = whole.bags[t].weight.detach()[store.ids]
            assert torch.allclose(store.get(store.ids), w, atol=1e-5)
        assert len(stores[0][t]) + len(stores[1][t]) < CARDS[t]  # lazily created
    for a, b in zip(whole.top.parameters(), sharded.top.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert client.peak_rows <= 2 * 64  # the worker held a batch's rows, never a table


def test_a_restarted_store_reloads_its_rows_and_goes_on_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(2)
    steps = []
    for _ in range(6):
        ids = torch.unique((torch.rand(40, generator=gen) ** 3 * 5000).long())
        steps.append((ids, torch.randn(len(ids), DIM, generator=gen)))
    a = RowStore(DIM, table=0, seed=SEED, scale=SCALE, optimizer="adam", lr=0.01)
    for ids, g in steps[:3]:
        a.apply(ids, g)
    path = str(tmp_path / "server-0")
    dcp.save(a.state_dict(), checkpoint_id=path, no_dist=True)
    meta = dcp.FileSystemReader(path).read_metadata()
    template = {k: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.state_dict_metadata.items()}
    dcp.load(template, checkpoint_id=path, no_dist=True)
    b = RowStore(DIM, table=0, seed=SEED, scale=SCALE, optimizer="adam", lr=0.01)
    b.load_state_dict(template)
    for ids, g in steps[3:]:
        a.apply(ids, g)
        b.apply(ids, g)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.state, b.state)


def test_a_servers_tables_ride_in_its_checkpoint_and_come_back(tmp_path):
    def host() -> TableHost:
        return TableHost([RowStore(DIM, table=t, seed=SEED, scale=SCALE, optimizer="adagrad")
                          for t in range(2)], Channel())

    a = host()
    gen = torch.Generator().manual_seed(4)
    for t, store in enumerate(a.stores):
        ids = torch.unique(torch.randint(0, CARDS[t], (30,), generator=gen))
        store.apply(ids, torch.randn(len(ids), DIM, generator=gen))
    ckpt.begin(tmp_path, 7)
    ckpt.save_shard(tmp_path, 7, 0, {"version": torch.tensor(7), **a.state_dict()})
    path = ckpt.commit(tmp_path, 7, {"progress": {}}, keep=2)
    b = host()
    b.load_state_dict(ckpt.load_rows(path, 0))
    for sa, sb in zip(a.stores, b.stores, strict=True):
        assert torch.equal(sa.ids, sb.ids)
        assert torch.equal(sa.values, sb.values)
        assert torch.equal(sa.state, sb.state)
        assert sa.steps == sb.steps == 1
        assert torch.equal(sb.get(sa.ids[:3]), sa.values[:3])  # its slots rebuilt


def test_peek_creates_no_row_and_ids_outside_a_table_are_refused():
    store = RowStore(4, table=0, seed=1, scale=0.1)
    store.apply(torch.tensor([3]), torch.ones(1, 4))
    got = store.peek(torch.tensor([3, 7]))
    assert len(store) == 1  # row 7 was only looked at
    assert torch.equal(got[0], store.get(torch.tensor([3]))[0])
    assert torch.equal(got[1], init_rows(torch.tensor([7]), 4, seed=1, table=0, scale=0.1)[0])
    model = ClickModel(num_dense=1, cardinalities=[10], dim=4)
    client = SparseClient(model, [RowPartition(10, 2)], fetch=lambda s, t, ids: store.peek(ids),
                          push=lambda *a: None)
    with pytest.raises(ValueError, match=r"ids 2\.\.12, outside its table's \[0, 10\)"):
        client.prepare(torch.tensor([[0.5, 2.0], [0.1, 12.0]]))


def test_a_click_model_built_for_row_servers_holds_no_table():
    with tables_elsewhere():
        model = ClickModel(num_dense=2, cardinalities=[10_000_000, 5], dim=16)
    assert sum(p.numel() for p in model.parameters()) < 10_000  # the MLP alone
    assert model(torch.tensor([[0.1, 0.2, 9_999_999.0, 4.0]])).shape == (1, 1)
    assert isinstance(ClickModel(num_dense=2, cardinalities=[5], dim=4).bags[0],
                      nn.EmbeddingBag)  # outside it, the tables are whole
