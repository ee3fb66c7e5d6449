"""The ``tide`` command line: local clusters (``up``, ``down``, ``status``, ``env``),
topics, produce, consume, groups and ``bench``.

Layout: ``model`` (cluster.json, pure), ``launch`` (ports, paths, argv; pure),
``processes`` (spawning, signalling, probing: the I/O shell), ``cluster`` (the
up/down/status procedures built from those), ``control`` (a tiny synchronous client
for the coordinator's documented REST API), ``client_commands`` and ``bench``
(built on the public client library), ``main`` (the click group).
"""
