"""DistributedSampler against torch.utils.data.DistributedSampler (counts, padding, strides)."""

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DistributedSampler as TorchSampler

from distprop.data.sampler import DistributedSampler

CASES = [(n, k, drop) for n in (1, 7, 10, 11, 1001) for k in (1, 2, 3, 4) for drop in (False, True)
         if not (drop and n < k)]


@pytest.mark.parametrize("n,replicas,drop_last", CASES)
def test_unshuffled_indices_equal_torch(n, replicas, drop_last):
    data = range(n)
    for rank in range(replicas):
        ours = DistributedSampler(data, replicas, rank, shuffle=False, drop_last=drop_last)
        theirs = TorchSampler(data, replicas, rank, shuffle=False, drop_last=drop_last)
        assert len(ours) == len(theirs)
        assert list(ours) == list(theirs)


@pytest.mark.parametrize("n,replicas,drop_last", CASES)
def test_shuffled_counts_and_padding_match_torch(n, replicas, drop_last):
    data = range(n)
    for epoch in (0, 1):
        ours_all, torch_all = [], []
        for rank in range(replicas):
            ours = DistributedSampler(data, replicas, rank, shuffle=True, seed=5,
                                      drop_last=drop_last)
            theirs = TorchSampler(data, replicas, rank, shuffle=True, seed=5,
                                  drop_last=drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert len(ours) == len(theirs) == len(list(ours))
            ours_all += list(ours)
            torch_all += list(theirs)
        # the same multiset shape: how many samples appear 0, 1, 2, ... times
        assert sorted(Counter(Counter(ours_all).values()).items()) == \
            sorted(Counter(Counter(torch_all).values()).items())
        assert set(ours_all) <= set(range(n))


def test_same_permutation_on_every_rank_and_new_one_each_epoch():
    data = range(100)
    samplers = [DistributedSampler(data, 4, r, seed=1) for r in range(4)]
    epoch0 = np.stack([s.indices() for s in samplers], 1).ravel()
    assert sorted(epoch0.tolist()) == list(range(100))  # interleaved ranks = one permutation
    np.testing.assert_array_equal(epoch0, np.random.default_rng(1).permutation(100))
    for s in samplers:
        s.set_epoch(1)
    epoch1 = np.stack([s.indices() for s in samplers], 1).ravel()
    assert sorted(epoch1.tolist()) == list(range(100)) and not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("n,replicas", [(1001, 3), (10, 4), (3, 4), (12, 3)])
def test_eval_mode_visits_every_sample_exactly_once(n, replicas):
    seen = []
    lengths = []
    for rank in range(replicas):
        s = DistributedSampler(range(n), replicas, rank, shuffle=True, pad=False)
        seen += list(s)
        lengths.append(len(s))
        assert len(s) == len(list(s))
    assert sorted(seen) == list(range(n))
    assert max(lengths) - min(lengths) <= 1


def test_defaults_come_from_the_world_and_bad_rank_is_refused():
    s = DistributedSampler(range(5))
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 5)
    with pytest.raises(ValueError, match=r"Invalid rank 3, rank should be in the interval"):
        DistributedSampler(range(5), num_replicas=3, rank=3)
