"""``asyncspade serve``: the server's flags; bad flags and a busy port fail before the model loads."""
from __future__ import annotations

import argparse
import pathlib
import socket

from ..server.defaults import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_NAME, DEFAULT_SHUTDOWN_TIMEOUT
from .args import UserError, add_model_args, add_model_len_arg, add_sparse_args, check_model_len, engine_options, \
    load, sparse_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sparse_args(p, "asyncspade", selector=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--max-batch", type=int, default=8, help="decode slots of the whole server: sequences decoded "
                   "together, whatever sparse settings requests ask for (default 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences allowed to wait for a slot; beyond, requests get 429 (default 64)")
    add_model_len_arg(g)
    g.add_argument("--max-tokens-context", dest="max_model_len", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)              # its former name
    g.add_argument("--max-engines", type=int, default=4, help="engines alive at once, one per distinct (method, "
                   "budget) of per-request overrides; they share the server's KV store and slots, an asyncspade or "
                   "lastq engine adds a cache-rank worker process (default 4)")
    g.add_argument("--decode-threads", type=int, default=None,
                   help="intra-op threads of decode steps while a cache-rank worker (--selector async|dist) runs "
                   "beside them; prefill always uses every thread (default: cores - 1, leaving the worker a core)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are read (default "
                   f"{DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help="on SIGTERM/SIGINT, seconds running requests may take to finish before each gets an error "
                   f"(default {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the /v1 routes (/health and "
                   "/metrics stay open, as in vLLM)")
    g.add_argument("--served-model-name", default=None,
                   help=f"model id in the API (default {DEFAULT_NAME!r}, or the --model path's name)")


def model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    return pathlib.Path(args.model).stem if args.model else DEFAULT_NAME


def bind(args) -> socket.socket:
    """Validate the server flags and bind the port (before the model loads, so mistakes fail fast)."""
    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--max-engines", args.max_engines, 1), ("--port", args.port, 1),
                        ("--decode-threads", 1 if args.decode_threads is None else args.decode_threads, 1),
                        ("--max-model-len", args.max_model_len or 1, 1),
                        ("--max-request-bytes", args.max_request_bytes, 1024),
                        ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise UserError(f"--port must be <= 65535, got {args.port}")
    try:
        info = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return sock


def app_from_args(args, model, tokenizer):
    from ..server import create_app
    check_model_len(args.max_model_len, model)
    return create_app(model, tokenizer, sparse_from_args(args), max_batch=args.max_batch, max_queue=args.max_queue,
                      max_model_len=args.max_model_len, max_engines=args.max_engines, selector=args.selector,
                      on_late=args.on_late, api_key=args.api_key, served_model_name=model_name(args),
                      decode_threads=args.decode_threads, max_request_bytes=args.max_request_bytes,
                      shutdown_timeout=args.shutdown_timeout, options=engine_options(args))


def run(args) -> int:
    from ..server import serve
    sparse_from_args(args)                     # bad sparse flags fail before the port and the model
    sock = bind(args)
    try:
        model, tokenizer = load(args)
        app = app_from_args(args, model, tokenizer)
    except BaseException:
        sock.close()
        raise
    serve(app, sock)
    return 0
