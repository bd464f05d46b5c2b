"""pushd: a push gateway for the web, on Twisted."""

__version__ = "0.1.0"
