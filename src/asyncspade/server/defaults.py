"""The server's defaults, importable without FastAPI (the CLI's ``--help`` shows them)."""
DEFAULT_NAME = "asyncspade-smollm2"
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20     # the longest prompt of an 8K-token context is ~50 KB of text or ids
DEFAULT_SHUTDOWN_TIMEOUT = 30.0           # seconds running requests may take to finish on SIGTERM
