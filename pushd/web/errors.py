"""The producer API's errors: a status, a code of the contract and a sentence."""

from __future__ import annotations

from typing import NamedTuple

from twisted.web.server import Request

from pushd.message import dump_json
from pushd.refused import Refused


class ApiError(Refused):
    """A request the producer API refuses, answered as the contract's JSON error."""


class Refusal(NamedTuple):
    """One of the contract's errors; `ApiError(*refusal)` raises it."""

    status: int
    code: str
    message: str


BAD_CHANNEL = Refusal(
    400, "bad_channel", "channel names match [A-Za-z0-9_.:@=+-]{1,128}, optionally #ids"
)
BAD_JSON = Refusal(400, "bad_json", "the body is not valid JSON")
BAD_TEXT = Refusal(400, "bad_text", "the body is not UTF-8 text")
BAD_SINCE = Refusal(400, "bad_since", "since must be a message id <ms>-<seq>")
BAD_LIMIT = Refusal(400, "bad_limit", "limit must be a whole number from 1 to 10000")
BAD_IDEMPOTENCY_KEY = Refusal(
    400, "bad_idempotency_key", "Idempotency-Key: 1 to 256 printable characters"
)
UNAUTHORIZED = Refusal(
    401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
)
LOOPBACK_ONLY = Refusal(
    403, "forbidden", "no API key is configured: the producer API answers loopback only"
)
NOT_FOUND = Refusal(404, "not_found", "no such resource")
PRESENCE_OFF = Refusal(
    404, "presence_off", "this channel has no presence (--presence, --join-leave)"
)
TOO_LARGE = Refusal(413, "too_large", "the body is larger than --max-message-size")
KEY_REUSED = Refusal(
    422,
    "idempotency_key_reused",
    "this Idempotency-Key was first used with another request; nothing was published",
)
UNAVAILABLE = Refusal(
    503, "unavailable", "the broker is unreachable; nothing was published, retry later"
)
READ_UNAVAILABLE = Refusal(503, "unavailable", "the broker is unreachable; retry later")

SHUTTING_DOWN = Refusal(
    503,
    "shutting_down",
    "this node is shutting down; nothing was published, retry (on another node)",
)
OUTCOME_UNKNOWN = Refusal(
    504,
    "outcome_unknown",
    "the broker did not answer in time: the message may or may not be stored;"
    " retry with the same Idempotency-Key",
)


def write_json(request: Request, status: int, body: bytes) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def write_error(request: Request, status: int, code: str, message: str) -> None:
    write_json(request, status, dump_json({"error": code, "message": message}))
