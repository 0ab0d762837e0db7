"""Demo and benchmark tooling: synthetic live traffic, the demo run, the benchmark and its peers."""
