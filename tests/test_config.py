"""Options: command line > environment > INI file > default; bad values stop start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pushd.broker.redis.address import RedisAddress, parse_redis_url
from pushd.config import Config, ConfigError, load
from pushd.tap import Options

TWISTD = str(Path(sys.executable).parent / "twistd")
ETC = Path(__file__).parent.parent / "etc" / "pushd.ini"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PUSHD_")]:
        monkeypatch.delenv(name)
    config = parse().config
    assert config == Config()
    assert config.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.redis == ()
    assert (config.history_size, config.history_ttl, config.max_message_size) == (100, 3600, 65536)


def test_precedence(tmp_path: Path) -> None:
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[pushd]\nhistory-size = 7\nhistory-ttl = 70\nmax-message-size = 700\n"
        "listen =\n    tcp:1\n    tcp:2\napi-key = from-file\n"
    )
    env = {"PUSHD_HISTORY_TTL": "80", "PUSHD_MAX_MESSAGE_SIZE": "800", "PUSHD_API_KEY": "e1 e2"}
    config = load({"config": str(ini), "max-message-size": "900", "api-key": []}, env)
    assert config.history_size == 7  # file
    assert config.history_ttl == 80  # environment over file
    assert config.max_message_size == 900  # command line over both
    assert config.listen == ("tcp:1", "tcp:2")
    assert config.api_key == ("e1", "e2")
    config = load({"config": str(ini), "api-key": ["c1"], "listen": ["tcp:3"]}, env)
    assert (config.api_key, config.listen) == (("c1",), ("tcp:3",))


def test_config_file_from_environment(tmp_path: Path) -> None:
    ini = tmp_path / "p.ini"
    ini.write_text("[pushd]\nredis = redis://:secret@127.0.0.1:7000/3\n")
    config = load({}, {"PUSHD_CONFIG": str(ini)})
    assert config.redis == (RedisAddress(host="127.0.0.1", port=7000, db=3, password="secret"),)


def test_shipped_example_is_valid() -> None:
    config = load({"config": str(ETC)}, {})
    assert config.listen == ("tcp:8080:interface=127.0.0.1",)


def test_redis_urls() -> None:
    assert parse_redis_url("redis://localhost") == RedisAddress(host="localhost")
    assert parse_redis_url("redis://u:p%40ss@h:1/2") == RedisAddress(
        host="h", port=1, db=2, username="u", password="p@ss"
    )
    assert parse_redis_url("unix:///run/redis.sock?db=4") == RedisAddress(
        path="/run/redis.sock", db=4
    )
    assert RedisAddress(path="/r.sock").endpoint() == "unix:/r.sock"
    for bad in ("http://x", "redis://", "redis://h:notaport", "redis://h/x", "unix://"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"history-size": "ten"}, "--history-size 'ten' (command line): must be a whole number"),
        ({"history-ttl": "0"}, "--history-ttl '0' (command line): must be 1 or more"),
        ({"listen": ["bogus:1"]}, "--listen 'bogus:1' (command line): Unknown endpoint type"),
        ({"redis": "http://x"}, "--redis 'http://x' (command line): expected redis://"),
        ({"config": "/nonexistent.ini"}, "--config: cannot read /nonexistent.ini"),
    ],
)
def test_bad_values_name_the_option(source: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(source, {})
    assert str(e.value).startswith(message)


def test_bad_environment_and_file_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PUSHD_PING_INTERVAL\): must be a number"):
        load({}, {"PUSHD_PING_INTERVAL": "soon"})
    ini = tmp_path / "bad.ini"
    ini.write_text("[pushd]\nno-such-option = 1\n")
    with pytest.raises(ConfigError, match="unknown option 'no-such-option'"):
        load({"config": str(ini)}, {})


def test_twistd_stops_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWISTD, "pushd", "--history-size", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pushd: error: --history-size '-3' (command line): must be 1 or more"
    ]


def test_readme_documents_every_option() -> None:
    from pushd.config import OPTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for option in OPTIONS:
        assert f"| `--{option.name}" in readme, option.name
    example = ETC.read_text()
    for option in OPTIONS:
        assert option.name in example, option.name
