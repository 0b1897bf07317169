"""Benchmarks (not tests): each writes bench/results/<name>.md with the machine it ran on."""
