"""twistd plugin: `twistd -n pushd --help`. Imports nothing else so twistd can pick the reactor first."""

from twisted.application.service import ServiceMaker

pushd = ServiceMaker(
    "pushd", "pushd.tap", "Push gateway: HTTP and Redis in, WebSocket out.", "pushd"
)
