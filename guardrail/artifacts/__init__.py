"""What is fetched, never committed: PyPI-wheel files, known models, shipped heads."""
