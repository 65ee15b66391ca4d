"""Performance benchmark of the export engine against two baselines (benchmarks/README.md); not a test."""
