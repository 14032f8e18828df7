"""Running the app under uvicorn with a graceful drain.

On SIGTERM/SIGINT the server stops admitting requests and lets running ones finish for ``--shutdown-timeout``
seconds; then each remaining one ends with an error (an error event and ``[DONE]`` on a stream, a 503 otherwise).
uvicorn's own grace period is set past that deadline, so it never cuts a stream itself.
"""
from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

_MARGIN_S = 10.0                  # uvicorn's grace beyond ours: time for the last error events to go out


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.state.drain()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    state = app.state.server
    host, port = sock.getsockname()[:2]
    engines = state.engines
    print(f"[asyncspade] {engines.engines[engines.default].path_note}", flush=True)
    print(f"[asyncspade] serving {state.name!r} on http://{host}:{port}/v1", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=state.shutdown_timeout + _MARGIN_S)
    _DrainingServer(config, state).run(sockets=[sock])
