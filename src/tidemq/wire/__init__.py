"""Bytes and JSON <-> typed messages. No I/O here."""
