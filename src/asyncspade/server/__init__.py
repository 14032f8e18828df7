"""``asyncspade serve``: an OpenAI-compatible HTTP server with continuous batching.

* :mod:`.protocol`: request bodies -> validated jobs, sequences -> response bodies and stream chunks;
* :mod:`.engines`: the one KV store, the engines that share it, the thread that steps them, the drain;
* :mod:`.app`: routes, the request guard (API key, size limit, errors), streaming;
* :mod:`.metrics`: Prometheus counters; :mod:`.serving`: uvicorn with a graceful drain;
* :mod:`.defaults`: the defaults, without FastAPI.

The command-line flags live in :mod:`asyncspade.cli.serve`.
"""
from .defaults import DEFAULT_NAME

__all__ = ["DEFAULT_NAME", "create_app", "serve"]


def __getattr__(name):     # FastAPI and uvicorn load on first use, not for `asyncspade serve --help`
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "serve":
        from .serving import serve
        return serve
    raise AttributeError(name)
