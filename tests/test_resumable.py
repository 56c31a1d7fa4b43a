"""The shared resumable training loader: its order, its shards and its position in the epoch."""

from __future__ import annotations

import pytest
import torch

from bigmodel.data.resumable import EpochSampler, ResumableLoader, train_loader
from bigmodel.errors import UserError


def loader(n: int = 50, world: int = 1, rank: int = 0, batch: int = 4, **kw) -> ResumableLoader:
    sampler = EpochSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, seed=7)
    return ResumableLoader(list(range(n)), sampler, batch_size=batch, **kw)


def flat(batches) -> list[int]:
    return [i for b in batches for i in b.tolist()]


def test_the_order_is_fixed_by_seed_and_epoch_and_every_epoch_covers_the_data():
    a, b = loader(), loader()
    assert flat(a) == flat(b)  # the same seed: the same order
    assert sorted(flat(a)) == list(range(50))
    a.sampler.set_epoch(1)
    assert flat(a) != flat(b) and sorted(flat(a)) == list(range(50))


def test_resuming_after_k_batches_yields_exactly_the_rest_and_keeps_the_epoch_length():
    full = [b.tolist() for b in loader()]
    for k in (0, 1, 5, len(full) - 1, len(full)):
        a = loader()
        it = iter(a)
        for _ in range(k):
            next(it)
        state = a.state_dict()
        assert state["consumed"] == 4 * k  # items, over all processes
        b = loader()
        b.load_state_dict(state)
        assert len(b) == len(full)  # Lightning counts the epoch's batches once
        assert [x.tolist() for x in b] == full[k:]
        assert [x.tolist() for x in b] == full  # the position applied once: then whole epochs


def test_a_saved_position_belongs_to_its_epoch():
    a = loader()
    it = iter(a)
    next(it), next(it)
    b = loader()
    b.load_state_dict(a.state_dict())
    b.sampler.set_epoch(1)  # Lightning moved on to the next epoch: it starts from the top
    c = loader()
    c.sampler.set_epoch(1)
    assert flat(b) == flat(c)


def test_two_ranks_shard_the_epoch_and_the_position_is_counted_over_both():
    ranks = [loader(world=2, rank=r) for r in (0, 1)]
    whole = [flat(r) for r in ranks]
    assert len(whole[0]) == len(whole[1]) == 25
    assert sorted(whole[0] + whole[1]) == list(range(50))  # disjoint, complete (50 is even)
    iters = [iter(r) for r in ranks]
    for it in iters:
        next(it), next(it)
    state = ranks[0].state_dict()
    assert state["consumed"] == 2 * 4 * 2 and state["world_size"] == 2
    for r in (0, 1):
        resumed = loader(world=2, rank=r)
        resumed.load_state_dict(state)  # rank 0's state, as Lightning saves it, on every rank
        assert flat(resumed) == whole[r][8:]
    with pytest.raises(UserError, match="written by 2 training processes and this run has 1"):
        loader().load_state_dict(state)


def test_an_odd_count_is_padded_like_distributed_sampler():
    ranks = [flat(loader(n=51, world=2, rank=r, batch=1)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 26
    assert set(ranks[0] + ranks[1]) == set(range(51))


def test_starting_an_epoch_draws_nothing_from_the_global_generator():
    dl = train_loader(None, list(range(10)), shuffle=True, seed=1, batch_size=2)
    before = torch.get_rng_state()
    next(iter(dl))
    assert torch.equal(before, torch.get_rng_state())
