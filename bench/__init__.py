"""Benchmarks for mls-relay (not part of the test suite; see bench/README.md)."""
