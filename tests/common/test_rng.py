"""RNG state: seeding, an exact capture/restore round trip, and restoring one rank's state of a checkpoint."""

import random

import numpy as np
import pytest
import torch

from mrgfast.common.rng import capture_rng_state, restore_rank_rng_state, restore_rng_state, seed_everything


def draws() -> tuple:
    """One draw from each global generator."""
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_repeats_every_stream():
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first


def test_restore_puts_back_the_captured_state():
    seed_everything(5)
    state = capture_rng_state()
    expected = draws()
    draws()
    restore_rng_state(state)
    assert draws() == expected


def test_a_state_without_a_generator_is_named():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="ckpt: missing numpy"):
        restore_rng_state(state, "ckpt")


def test_restore_rank_takes_that_ranks_state():
    seed_everything(1)
    states = [capture_rng_state()]
    seed_everything(2)
    states.append(capture_rng_state())
    expected = draws()
    seed_everything(7)
    restore_rank_rng_state(states, 1, "ckpt")
    assert draws() == expected


@pytest.mark.parametrize("rank", [2, -1])
def test_restore_rank_without_a_state_is_an_error(rank):
    states = [capture_rng_state(), capture_rng_state()]
    with pytest.raises(ValueError, match=rf"^ckpt: holds RNG states for 2 rank\(s\), cannot restore rank {rank}; "
                                         "resume with the same number of processes$"):
        restore_rank_rng_state(states, rank, "ckpt")
