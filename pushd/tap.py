"""The twistd entry point: `twistd -n pushd [options]`."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from twisted.python import usage

from pushd import __version__, collector, logs, polling
from pushd import config as _config
from pushd.service import StartupError, make_service


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

    def opt_version(self) -> None:
        """pushd's version (and Twisted's, Python's), then exit"""
        import platform

        import twisted

        python = platform.python_version()
        print(f"pushd {__version__} (Twisted {twisted.__version__}, Python {python})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = _config.load(self)
        except _config.ConfigError as e:
            # twistd would print its whole usage text before a UsageError.
            sys.stderr.write(f"pushd: error: {e}\n")
            raise SystemExit(2) from None
        twistd = getattr(self, "parent", None)
        if twistd is not None:
            # twistd sets its log up after this and before makeService runs.
            from pushd.workers import secret_strings

            logs.configure(twistd, self.config.log_format, secret_strings(self.config))


def _repeatable(option: _config.Option) -> Any:
    def opt(self: Options, value: str) -> None:
        self[option.name].append(value)

    opt.__doc__ = _help(option)
    return opt


for _o in _config.OPTIONS:
    if _o.repeatable:
        setattr(Options, f"opt_{_o.key}", _repeatable(_o))


def one_line_failures(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """sys.excepthook under twistd: a StartupError that ends twistd (it raises
    out of startService) is one line on the real stderr (twistd has made
    sys.stderr a log), not a traceback."""
    if isinstance(error, StartupError):
        real = sys.__stderr__ or sys.stderr
        real.write(f"pushd: {error}\n")
        real.flush()
        return
    sys.__excepthook__(kind, error, traceback)


def makeService(options: Options) -> Any:
    config = options.config
    sys.excepthook = one_line_failures
    from twisted.internet import reactor

    if config.workers > 1:
        from twisted.application.service import MultiService, Service

        from pushd.workers import WorkerPool

        parent = MultiService()
        pool: Service = WorkerPool(config, reactor)
        pool.setServiceParent(parent)
        return parent
    service = make_service(config, reactor)
    collector.tune()
    polling.dispatch_directly(reactor)
    return service
