"""Benchmarks run by ``moeinf bench ...``: each prints a table and can write its numbers as JSON."""
