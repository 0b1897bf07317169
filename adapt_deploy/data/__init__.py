"""Datasets, label tables and the synthetic domain-shift benchmark."""
