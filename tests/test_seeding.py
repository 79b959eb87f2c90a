"""The named seed streams keep the formulas every committed result was produced with."""

import random

import pytest

from refloop.seeding import step_seed, text_seeded_rng


def test_seed_streams_keep_their_historical_formulas():
    assert step_seed(2, 5, "batch") == 2 * 1_000_003 + 5
    assert step_seed(2, 5, "torch", rank=3) == 2 * 1_000_003 + 5 + 7919 * 3
    assert step_seed(2, 5, "mix") == 2 * 31 + 5
    assert step_seed(4, 3, "svp-iteration") == 4 + 7919 * 3  # SVP's outer iteration i samples from seed + 7919 i


def test_text_seeded_stream_draws_as_svp_always_drew():
    assert text_seeded_rng("svp-cvq", 7).sample(range(100), 5) == random.Random("refloop-svp-cvq/7").sample(range(100), 5)
    with pytest.raises(ValueError, match="unknown text-seeded stream"):
        text_seeded_rng("dropout", 0)
