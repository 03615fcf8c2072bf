"""Both sides in one run: benchmarks, attack suites, and the content judge."""
