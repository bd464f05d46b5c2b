"""The subscribers' transports, one module each: `websocket` (`/ws`, with the
Autobahn memory diet in `autobahn_diet`), `sse` (`/sse`) and `ndjson`
(`/stream`) on the machinery they share in `stream`; each writes through
`pushd.sending`, the cheap write every fan-out uses."""
