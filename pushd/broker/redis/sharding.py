"""Which shard a channel lives on: jump consistent hash of a fixed digest.

    key   = the first 8 bytes of SHA-1(<channel name as UTF-8>), big-endian,
            as an unsigned 64-bit integer
    shard = jump_hash(key, number of shards)   (0-based, the --redis order)

`jump_hash` is Lamping and Veach's "A Fast, Minimal Memory, Consistent Hash
Algorithm" (2014), exactly as published: any language computes the same shard
with the same ten lines. Adding a shard at the END of the list moves about
1/n of the channels (to the new shard only); any other change of the list
moves most of them (README, "Shards").
"""

from __future__ import annotations

import hashlib

_MASK = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """The bucket (0 to `buckets` - 1) of the unsigned 64-bit `key`."""
    if buckets < 1:
        raise ValueError("no buckets")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def channel_key(channel: str) -> int:
    """The hash key of a channel: SHA-1's first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha1(channel.encode()).digest()[:8], "big")


def shard_of(channel: str, shards: int) -> int:
    """The index (0-based, in --redis order) of the shard `channel` lives on."""
    return 0 if shards == 1 else jump_hash(channel_key(channel), shards)
