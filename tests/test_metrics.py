"""Metrics for Prometheus: who may scrape /metrics, the process and version
series, Redis command latency, and the Grafana dashboard in etc/, whose every
query must name a metric a real pushd exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pushd
from pushd.config import ConfigError, load, split_secrets
from pushd.metrics import Metrics
from tests.support import Node, PushdUnderTest, RedisServer, redis_options

DASHBOARD = Path(__file__).parent.parent / "etc" / "grafana-pushd.json"


async def scrape(url: str, key: str | None = None, client: str | None = None) -> int:
    """The status of GET /metrics with `Bearer key`, from `client` (an
    X-Forwarded-For pushd believes when started with --trusted-proxies 1)."""
    headers: dict[str, list[str]] = {}
    if key is not None:
        headers["authorization"] = [f"Bearer {key}"]
    if client is not None:
        headers["x-forwarded-for"] = [client]
    response = await treq.get(f"{url}/metrics", headers=headers, persistent=False)
    await response.content()
    return int(response.code)


async def scrapes(**options: Any) -> dict[tuple[str | None, str | None], int]:
    """/metrics' status for each (key, client address) pushd with `options` is asked with."""
    server = PushdUnderTest.config(trusted_proxies=1, **options)
    await server.start()
    try:
        return {
            (key, client): await scrape(server.url, key, client)
            for key in (None, "producer", "prometheus", "wrong")
            for client in (None, "10.1.2.3", "192.0.2.7")
        }
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_without_keys_loopback_and_allowed_networks_scrape() -> None:
    got = await scrapes(metrics_allow=load({"metrics-allow": ["10.0.0.0/8"]}, {}).metrics_allow)
    for key in (None, "producer", "prometheus", "wrong"):
        # Keys mean nothing here: the address decides.
        assert got[key, None] == 200  # loopback
        assert got[key, "10.1.2.3"] == 200  # --metrics-allow
        assert got[key, "192.0.2.7"] == 403


@pytest_twisted.ensureDeferred
async def test_a_producer_key_still_scrapes_until_metrics_keys_are_given() -> None:
    # As before --metrics-key existed: a producer key, or loopback.
    got = await scrapes(api_key=("producer",))
    assert got[None, None] == 200
    assert got["producer", "192.0.2.7"] == 200
    assert got[None, "192.0.2.7"] == got["prometheus", "192.0.2.7"] == 401


@pytest_twisted.ensureDeferred
async def test_a_metrics_key_scrapes_and_nothing_else_does() -> None:
    # As pushd.testing's make_config takes it: strings.
    allowed = ("10.0.0.0/8",)
    got = await scrapes(api_key=("producer",), metrics_key=("prometheus",), metrics_allow=allowed)
    for client in (None, "10.1.2.3", "192.0.2.7"):
        assert got["prometheus", client] == 200
    # The producer key and loopback no longer open /metrics; a listed network does.
    assert got["producer", None] == got[None, None] == got["wrong", "192.0.2.7"] == 401
    assert got["producer", "192.0.2.7"] == 401
    assert got[None, "10.1.2.3"] == 200


@pytest_twisted.ensureDeferred
async def test_a_metrics_key_cannot_publish() -> None:
    server = PushdUnderTest.config(api_key=("producer",), metrics_key=("prometheus",))
    await server.start()
    try:
        refused = await server.post("c", "x", headers={"authorization": ["Bearer prometheus"]})
        assert refused.code == 401
        accepted = await server.post("c", "x", headers={"authorization": ["Bearer producer"]})
        assert accepted.code == 200
    finally:
        await server.stop()


def test_metrics_options() -> None:
    config = load({"metrics-allow": ["10.1.2.3/8", "192.0.2.7", "fd00::/8"]}, {})
    assert [str(n) for n in config.metrics_allow] == ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]
    with pytest.raises(ConfigError, match=r"--metrics-allow 'ten' .*expected an address"):
        load({"metrics-allow": ["ten"]}, {})
    # A metrics key is a secret: --workers hands it over outside the command line.
    public, secret = split_secrets(load({"metrics-key": ["k"]}, {}).given)
    assert secret == {"metrics-key": ["k"]} and "metrics-key" not in public


def families(text: str) -> dict[str, Any]:
    """The metric families of a /metrics text, by name (a counter's without `_total`)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(found: dict[str, Any], family: str, name: str, **labels: str) -> float | None:
    for s in found[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


async def busy_node(tmp_path: Path, redis_server: RedisServer, prefix: str) -> tuple[Node, str]:
    """A twistd pushd on Redis with a subscriber that got 3 messages; its /metrics text."""
    node = Node(tmp_path, *redis_options([redis_server], prefix))
    node.start()
    await node.ready()
    client = await node.connect("?channel=m")
    await client.next_of("subscribed")
    for n in range(3):
        await node.publish("m", n)
    for _ in range(3):
        await client.next_of("message")
    response = await treq.get(f"{node.url}/metrics", persistent=False)
    assert response.code == 200
    text = await response.text()
    await client.close()
    return node, text


@pytest_twisted.ensureDeferred
async def test_process_version_and_redis_series(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    node, text = await busy_node(tmp_path, redis_server, prefix)
    try:
        found = families(text)
        info = found["pushd_build_info"].samples[0]
        assert info.value == 1
        assert info.labels["version"] == pushd.__version__
        assert re.fullmatch(r"3\.\d+\.\d+", info.labels["python"])
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", info.labels["twisted"])
        assert sample(found, "process_resident_memory_bytes", "process_resident_memory_bytes")
        assert sample(found, "process_open_fds", "process_open_fds")
        started = sample(found, "process_start_time_seconds", "process_start_time_seconds")
        assert started and started > 1.7e9
        assert found["process_cpu_seconds"].type == "counter"
        assert "python_info" in found
        # The three publishes went through the publish connection's publish.lua;
        # node.ready()'s GET /channels/ready through the pool's count.lua.
        redis = "pushd_redis_command_seconds"
        count = sample(found, redis, f"{redis}_count", shard="0", command="publish.lua")
        assert count == 3
        assert sample(found, redis, f"{redis}_count", shard="0", command="count.lua")
        assert sample(found, redis, f"{redis}_sum", shard="0", command="publish.lua")
    finally:
        node.stop()


def test_command_seconds_is_a_prometheus_histogram() -> None:
    # pushd's own histogram (no locks on the publish path), as Prometheus reads it.
    metrics = Metrics()
    series = metrics.redis_seconds.labels(shard="1", command="publish.lua")
    for seconds in (0.0001, 0.0003, 0.0003, 0.02, 7.0):
        series.observe(seconds)
    found = families(generate_latest(metrics.registry).decode())
    family = found["pushd_redis_command_seconds"]
    assert family.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    # Cumulative, each bound counting what equals it.
    assert (buckets["0.0001"], buckets["0.00025"], buckets["0.0005"]) == (1, 1, 3)
    assert (buckets["0.025"], buckets["2.5"], buckets["+Inf"]) == (4, 4, 5)
    name = "pushd_redis_command_seconds"
    labels = {"shard": "1", "command": "publish.lua"}
    assert sample(found, name, f"{name}_count", **labels) == 5
    assert sample(found, name, f"{name}_sum", **labels) == pytest.approx(7.0207)


def without_created(text: str) -> dict[str, list[tuple[str, tuple[Any, ...], float]]]:
    """A /metrics text's samples by family, but prometheus_client's `_created`."""
    return {
        name: sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for s in family.samples
            if not s.name.endswith("_created")
        )
        for name, family in families(text).items()
        if not name.endswith("_created")
    }


def test_publish_counters_and_histogram_read_as_prometheus_clients_would() -> None:
    # The publish path's metrics count without locks; Prometheus reads the same
    # as from prometheus_client's Counter and Histogram told the same.
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from pushd.metrics import PUBLISH_BUCKETS

    metrics = Metrics()
    theirs = CollectorRegistry()
    published = Counter("pushd_messages_published", "x", ["api"], registry=theirs)
    deliveries = Counter("pushd_deliveries", "x", registry=theirs)
    seconds = Histogram("pushd_publish_seconds", "x", buckets=PUBLISH_BUCKETS, registry=theirs)
    for api, count in (("channels", 1), ("push", 1), ("channels", 400), ("client", 1)):
        metrics.published.labels(api).inc(count)
        published.labels(api).inc(count)
    for n in (3, 0, 10_000):
        metrics.deliveries.inc(n)
        deliveries.inc(n)
    for s in (0.0001, 0.0005, 0.0007, 0.3, 5.0, 9.0):
        metrics.publish_seconds.observe(s)
        seconds.observe(s)
    ours = without_created(generate_latest(metrics.registry).decode())
    expected = without_created(generate_latest(theirs).decode())
    for name in expected:
        assert ours[name] == expected[name], name
    assert (
        sample(
            families(generate_latest(metrics.registry).decode()),
            "pushd_deliveries",
            "pushd_deliveries_total",
        )
        == 10_003
    )
    # Before any publish: no api series, deliveries at 0.
    fresh = families(generate_latest(Metrics().registry).decode())
    assert [s.name for s in fresh["pushd_messages_published"].samples] == []
    assert sample(fresh, "pushd_deliveries", "pushd_deliveries_total") == 0


# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


#: A sample's suffix, and the type of the family it belongs to.
_SUFFIXES = {
    "_bucket": "histogram",
    "_count": "histogram",
    "_sum": "histogram",
    "_total": "counter",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    # Label lists of grouping modifiers, and label_values' label argument.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"(label_values\(\s*[A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1)", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function, or an operator
        names.add(word)
    return names


def dashboard_queries() -> list[str]:
    """Every `expr` of the dashboard's panels (rows' too) and its variables' queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            panels(panel.get("panels", []))

    panels(board["panels"])
    for variable in board["templating"]["list"]:
        query = variable["query"]
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_metric_names_of_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, command) (rate(pushd_x_bucket{a=~"$i"}[5m])))'
    ) == {"pushd_x_bucket"}
    assert metric_names("sum(rate(a_sum[1m])) / on (job) sum(b_count) and time() - c") == {
        "a_sum",
        "b_count",
        "c",
    }
    assert metric_names("label_values(pushd_build_info, instance)") == {"pushd_build_info"}


@pytest_twisted.ensureDeferred
async def test_every_dashboard_query_names_a_metric_pushd_exposes(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS"
    sources = {json.dumps(p.get("datasource")) for p in board["panels"] if p["type"] != "row"}
    assert sources == {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}

    node, text = await busy_node(tmp_path, redis_server, prefix)
    node.stop()
    exposed = {name: family.type for name, family in families(text).items()}
    with_samples = {s.name for family in families(text).values() for s in family.samples}
    queries = dashboard_queries()
    assert len(queries) > 20
    wanted: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, expr
        wanted |= names
    for name in sorted(wanted):
        assert name.startswith(("pushd_", "process_")), name
        family, kind = name, None
        for suffix, kind_of_suffix in _SUFFIXES.items():
            if name.endswith(suffix) and name not in exposed:
                family, kind = name.removesuffix(suffix), kind_of_suffix
        assert family in exposed, f"{name}: no {family} in /metrics"
        if kind is not None:
            assert exposed[family] == kind, (name, exposed[family])
        # A labelled series exists once its event happened; the busy node caused
        # every event but these (which it declares all the same: checked above).
        if family not in ("pushd_slow_consumers_dropped", "pushd_auth_refused", "pushd_bus_errors"):
            assert name in with_samples or family in with_samples, f"{name}: no sample"
    # The panels the dashboard promises.
    for needed in (
        "pushd_connections",
        "pushd_subscriptions",
        "pushd_messages_published_total",
        "pushd_deliveries_total",
        "pushd_publish_seconds_bucket",
        "pushd_redis_up",
        "pushd_redis_command_seconds_bucket",
        "pushd_slow_consumers_dropped_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert needed in wanted, needed
