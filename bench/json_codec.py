#!/usr/bin/env python3
"""pushd's JSON functions, old (the stdlib's C encoder and scanner, through
their private entry points) next to new (orjson, the stdlib only for what
orjson will not take exactly), per call:

    python bench/json_codec.py [--repeat 7] [--seconds 0.2]

Each figure is the median of --repeat timings of a loop that runs about
--seconds, in ns per call; the last column is old/new (above 1: new is
faster). The old functions are copied below as they were before the switch,
so the comparison needs no other checkout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from json.encoder import (  # type: ignore[attr-defined]
    c_encode_basestring,
    c_make_encoder,
)
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pushd import message as new

# -- the old functions (pushd/message.py before orjson), verbatim but for names


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


_old_encode = c_make_encoder(
    None, _not_json, c_encode_basestring, None, ":", ",", False, False, True
)


def _old_compact(value: Any) -> str:
    return "".join(_old_encode(value, 0))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_old_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def old_load_json(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = text.strip(" \t\r\n")
    try:
        value, end = _old_decoder.scan_once(text, 0)  # type: ignore[attr-defined]
    except StopIteration:
        raise ValueError("not JSON") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(text):
        raise ValueError("not one JSON value")
    return value


def old_dump_json(value: Any) -> bytes:
    return _old_compact(value).encode()


old_data_json = old_dump_json


def old_data_from_body(body: bytes, content_type: str | None) -> bytes:
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    text = body.decode("utf-8")
    if ctype == "application/json" or ctype.endswith("+json"):
        return old_data_json(old_load_json(text))
    return old_dump_json(text)


# -- the cases

SMALL = b'{"t":1732521234567890,"pad":"' + b"x" * 69 + b'"}'  # bench/post.lua's 100 bytes
EVENT = json.dumps(
    {
        "type": "order.updated",
        "user": {"id": 123456, "name": "Zoë Müller", "tags": ["vip", "beta"]},
        "items": [{"sku": f"SKU-{i}", "qty": i, "price": 9.99 + i} for i in range(12)],
        "ts": 1732521234.567,
        "ok": True,
        "note": None,
    }
).encode()  # ~1 KB, nested, floats, non-ASCII
BIG = json.dumps(
    {"rows": [[i, f"row {i}", i * 0.5, {"k": "v" * 20}] for i in range(1200)]}
).encode()  # ~60 KB, under --max-message-size
TEXT = ("plain text message, not JSON: " + "é" * 40).encode()
NS_TIMESTAMP = b'{"t":1732521234567890123,"pad":"' + b"x" * 66 + b'"}'  # 19 digits
ANSWER = {"channel": "news", "id": "1732521234567-0"}
JSON = "application/json"
LINE = b'{"channel":"bench","data":' + SMALL + b"}"  # one line of a batch


def cases() -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    small_v, event_v, big_v = (json.loads(x) for x in (SMALL, EVENT, BIG))
    return [
        (
            "data_from_body 100 B JSON (POST)",
            lambda: old_data_from_body(SMALL, JSON),
            lambda: new.data_from_body(SMALL, JSON),
        ),
        (
            "data_from_body 1 KB JSON",
            lambda: old_data_from_body(EVENT, JSON),
            lambda: new.data_from_body(EVENT, JSON),
        ),
        (
            f"data_from_body {len(BIG) // 1000} KB JSON",
            lambda: old_data_from_body(BIG, JSON),
            lambda: new.data_from_body(BIG, JSON),
        ),
        (
            "data_from_body 100 B JSON, 19-digit int",
            lambda: old_data_from_body(NS_TIMESTAMP, JSON),
            lambda: new.data_from_body(NS_TIMESTAMP, JSON),
        ),
        (
            "data_from_body text",
            lambda: old_data_from_body(TEXT, "text/plain"),
            lambda: new.data_from_body(TEXT, "text/plain"),
        ),
        ("load_json batch line", lambda: old_load_json(LINE), lambda: new.load_json(LINE)),
        (
            "batch line: load_json + data_json(data)",
            lambda: old_data_json(old_load_json(LINE)["data"]),
            lambda: new.data_json(new.load_json(LINE)["data"]),
        ),
        ("load_json 1 KB", lambda: old_load_json(EVENT), lambda: new.load_json(EVENT)),
        ("data_json 100 B value", lambda: old_data_json(small_v), lambda: new.data_json(small_v)),
        ("data_json 1 KB value", lambda: old_data_json(event_v), lambda: new.data_json(event_v)),
        ("data_json 60 KB value", lambda: old_data_json(big_v), lambda: new.data_json(big_v)),
        ("dump_json answer", lambda: old_dump_json(ANSWER), lambda: new.dump_json(ANSWER)),
        ("dump_json channel name", lambda: old_dump_json("news"), lambda: new.dump_json("news")),
    ]


def ns_per_call(fn: Callable[[], Any], seconds: float, repeat: int) -> float:
    n = 1
    while True:  # calibrate: a loop of about `seconds`
        start = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - start
        if took >= seconds / 10:
            break
        n *= 4
    n = max(1, int(n * seconds / took))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - start) / n)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.2)
    args = parser.parse_args()
    import orjson

    print(f"python {sys.version.split()[0]}, orjson {orjson.__version__}; ns per call, median")
    print(f"{'case':42} {'old':>10} {'new':>10} {'old/new':>8}")
    for name, old_fn, new_fn in cases():
        assert json.loads(old_fn()) == json.loads(new_fn()) if name.startswith("d") else True
        old_ns = ns_per_call(old_fn, args.seconds, args.repeat)
        new_ns = ns_per_call(new_fn, args.seconds, args.repeat)
        print(f"{name:42} {old_ns:10.0f} {new_ns:10.0f} {old_ns / new_ns:8.2f}")


if __name__ == "__main__":
    main()
