"""loadtest: edgeterm against haproxy and nginx on loopback (issue 5); see ``-m loadtest -h``."""
