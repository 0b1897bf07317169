"""Adaptation methods: the shared losses and one loss recipe per method over the same model."""

from __future__ import annotations

from adapt_deploy import registry
from adapt_deploy.adapt.base import Method

# Every registered method's class by name (adapt_deploy.registry.METHODS is the source).
METHOD_CLASSES: dict[str, type[Method]] = {
    name: registry.METHODS.load(name) for name in registry.METHODS.names()
}

__all__ = ["METHOD_CLASSES", "Method"]
