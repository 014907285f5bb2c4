"""Benchmarks and the load test, run as modules: ``python -m benchmarks.chat`` (or ``.load``).

``benchmarks.execution`` times connector runs, ``benchmarks.chat`` chat streams, and
``benchmarks.load`` checks every answer under load; ``benchmarks.common`` holds what they
share (percentiles, machine facts, markdown). Each starts the real server from this tree.
"""
