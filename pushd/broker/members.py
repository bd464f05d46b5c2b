"""How a presence member is stored (the Redis broker's hash values, the memory
broker's dict values): `<n>:<user key><member JSON>`, where the user key is
"" for a member without user and "u" + the user id otherwise, and n its
length in bytes. The user key comes first so that a reader counts distinct
users without parsing JSON (Lua included: presence_read.lua).

A member that left a channel whose leaves are announced stays stored, as a
*tombstone* (its value after TOMBSTONE), until its leave is announced:
readers count and list no tombstone, and the node that reaps a dead node
announces its tombstones' leaves too, so no leave is lost with a node."""

from __future__ import annotations

from pushd.message import dump_json


def stored(client: str, user: str | None, info: bytes) -> bytes:
    """The stored value of a member; `info` is compact JSON (b"null": none)."""
    member = b'{"client":' + dump_json(client) + b',"user":' + dump_json(user)
    member += b',"info":' + info + b"}"
    key = b"" if user is None else b"u" + user.encode("utf-8", "surrogatepass")
    return b"%d:%s%s" % (len(key), key, member)


#: The first byte of a tombstone (a member's value starts with a digit).
TOMBSTONE = b"~"


def tombstone(value: bytes) -> bytes:
    """The tombstone of a stored member."""
    return TOMBSTONE + value


def split(value: bytes) -> tuple[bytes, bytes]:
    """(user key, member JSON) of a stored value or tombstone; ValueError when
    it is neither."""
    head, sep, rest = value.removeprefix(TOMBSTONE).partition(b":")
    if not sep or not head.isdigit() or len(head) > 6:
        raise ValueError("not a stored member")
    n = int(head)
    if n > len(rest):
        raise ValueError("not a stored member")
    return rest[:n], rest[n:]
