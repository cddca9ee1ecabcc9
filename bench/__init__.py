"""virtua benchmarks: ``python -m bench storage|nbd [options]`` (not tests; they print tables)."""
