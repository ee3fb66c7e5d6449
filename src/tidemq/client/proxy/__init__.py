"""``tide proxy``: the client as a microservice for programs in any language.

``codec`` (JSON, SSE and the seed's text forms; pure), ``sessions`` (the session
table and request limits; pure), ``openapi`` (schemas for the endpoint table),
``server`` (the HTTP shell), ``main`` (the command).
The HTTP API is in docs/PROTOCOL.md ("tide proxy").
"""
