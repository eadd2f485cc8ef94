"""The process manager: owns listening sockets, forks and supervises workers."""
