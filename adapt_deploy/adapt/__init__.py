"""Adaptation methods: the shared losses and one loss recipe per method over the same model."""
