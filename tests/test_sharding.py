"""Which shard a channel lives on (pushd/broker/redis/sharding.py): the
published jump consistent hash, over a digest any language computes."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.broker.redis.sharding import channel_key, jump_hash, shard_of

# Published values: ClickHouse's tests of jumpConsistentHash
# (tests/queries/0_stateless/00580_consistent_hashing_functions) and
# Microsoft's JumpConsistentHash tests.
VECTORS = [
    (1, 1, 0),
    (42, 57, 43),
    (256, 1024, 520),
    (3735883980, 1, 0),
    (3735883980, 666, 361),
    (16045690984833335023, 255, 237),
    (10863919174838991, 11, 6),
    (2016238256797177309, 11, 3),
]


@pytest.mark.parametrize(("key", "buckets", "bucket"), VECTORS)
def test_jump_hash_gives_the_published_buckets(key: int, buckets: int, bucket: int) -> None:
    assert jump_hash(key, buckets) == bucket


def test_the_key_is_sha1s_first_eight_bytes_big_endian() -> None:
    digest = hashlib.sha1(b"news").digest()
    assert channel_key("news") == int.from_bytes(digest[:8], "big")
    assert channel_key("dm#alice,bob") == int.from_bytes(
        hashlib.sha1(b"dm#alice,bob").digest()[:8], "big"
    )


def test_channels_spread_evenly() -> None:
    counts = Counter(shard_of(f"channel-{n}", 4) for n in range(40_000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(9_000 < c < 11_000 for c in counts.values()), counts


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_adding_a_shard_at_the_end_moves_channels_only_to_it(channel: str, shards: int) -> None:
    before, after = shard_of(channel, shards), shard_of(channel, shards + 1)
    assert 0 <= before < shards
    assert after in (before, shards)


def test_one_shard_is_shard_zero() -> None:
    assert {shard_of(f"c{n}", 1) for n in range(100)} == {0}
    with pytest.raises(ValueError):
        jump_hash(1, 0)
