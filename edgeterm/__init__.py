"""edgeterm: a TLS termination edge server.

`edgeterm` is the shared vocabulary (config, TLS contexts, framing, socket options, CLI);
`edgeterm.workers` is the data plane and `edgeterm.supervisor` the process manager.
Dependencies point one way: supervisor -> edgeterm <- workers.
"""

__version__ = "0.1.0"
