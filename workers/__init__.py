"""The data plane: one epoll loop per worker process, terminating TLS and forwarding to TCP."""
