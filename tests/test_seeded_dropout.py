"""IterationDropout: masks from (seed, iteration), drawn for the whole global batch."""

from __future__ import annotations

import pytest
import torch

from adapt_deploy.adapt.data_parallel import Collectives, collectives
from adapt_deploy.adapt.seeded_dropout import IterationDropout


def test_it_drops_and_scales_as_dropout_and_repeats_its_masks_per_iteration():
    drop = IterationDropout(0.25, seed=3)
    x = torch.ones(4, 19, 16, 32)
    drop.reseed(7)
    first = drop(x)
    assert torch.equal(first.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (first == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    drop.reseed(7)
    assert torch.equal(drop(x), first)  # a resumed run draws the same masks
    drop.reseed(8)
    assert not torch.equal(drop(x), first)
    assert torch.equal(IterationDropout(0.0, 3)(x), x)
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        IterationDropout(1.0, 3)


def test_each_process_keeps_its_rows_of_the_whole_batch_mask():
    x = torch.randn(4, 5, 6, 7)
    drop = IterationDropout(0.5, seed=0)
    drop.reseed(2)
    whole = drop(x)
    for rank in (0, 1):
        active = Collectives(mean=lambda t: t, earlier=lambda v: [], rank=rank, size=2)
        with collectives(active):
            drop.reseed(2)
            torch.testing.assert_close(
                drop(x[2 * rank : 2 * rank + 2]), whole[2 * rank : 2 * rank + 2]
            )
