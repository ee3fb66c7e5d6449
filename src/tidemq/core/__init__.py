"""Pure decisions of tidemq: placement, cluster metadata, consumer groups.

Nothing here does I/O, reads a clock or draws random numbers: time and fresh ids
come in as arguments, so every function can be tested in microseconds and driven
by a seeded simulation.
"""
