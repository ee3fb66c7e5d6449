"""The coordinator service: the HTTP shell over :mod:`tidemq.core` and its SQLite store."""
