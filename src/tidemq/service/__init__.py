"""Plumbing every tidemq server shares: routes from a table, errors as JSON,
request limits, metrics, health, OpenAPI, and running under TLS.

The coordinator and the broker both build on this package; they never import
each other.
"""
