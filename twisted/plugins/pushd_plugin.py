"""The twistd plugin. It imports nothing more, so that twistd picks the reactor first."""

from twisted.application.service import ServiceMaker

pushd = ServiceMaker(
    "pushd", "pushd.tap", "Push gateway: HTTP and Redis in, WebSocket out.", "pushd"
)
