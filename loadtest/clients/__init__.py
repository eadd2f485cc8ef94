"""The C programs loadtest runs (the TLS load client and the plaintext upstream) and their build."""
