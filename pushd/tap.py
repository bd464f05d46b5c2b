"""The twistd entry point: `twistd -n pushd [options]`."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from pushd import config as _config
from pushd.service import make_service


def _help(o: _config.Option) -> str:
    if o.default is None or o.default == ():
        return o.help
    default = " ".join(o.default) if o.repeatable else o.default
    return f"{o.help} [default: {default}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "pushd: a push gateway. Every option also reads PUSHD_<OPTION> from the "
        "environment; precedence: command line > environment > --config file > default."
    )
    optParameters = [
        ["config", "c", None, "INI file with a [pushd] section (see etc/pushd.ini)"],
        *[[o.name, None, None, _help(o)] for o in _config.OPTIONS if not o.repeatable],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        for o in _config.OPTIONS:
            if o.repeatable:
                self[o.name] = []

    def postOptions(self) -> None:
        try:
            self.config = _config.load(self)
        except _config.ConfigError as e:
            # twistd would print its whole usage text before a UsageError.
            sys.stderr.write(f"pushd: error: {e}\n")
            raise SystemExit(2) from None


def _repeatable(option: _config.Option) -> Any:
    def opt(self: Options, value: str) -> None:
        self[option.name].append(value)

    opt.__doc__ = _help(option)
    return opt


for _o in _config.OPTIONS:
    if _o.repeatable:
        setattr(Options, f"opt_{_o.key}", _repeatable(_o))


def makeService(options: Options) -> Any:
    config = options.config
    if config.workers > 1:
        from twisted.application.service import MultiService, Service
        from twisted.internet import reactor

        from pushd.workers import WorkerPool

        parent = MultiService()
        pool: Service = WorkerPool(config, reactor)
        pool.setServiceParent(parent)
        return parent
    return make_service(config)
