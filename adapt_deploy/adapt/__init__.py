"""Adaptation methods: the shared losses and one loss recipe per method over the same model."""

from __future__ import annotations

from adapt_deploy.adapt.adaptsegnet import AdaptSegNet
from adapt_deploy.adapt.advent import Advent, AdventMinEnt
from adapt_deploy.adapt.base import Method
from adapt_deploy.adapt.wda import WeakLabelAdaptation, WeakLabelImage, WeakLabelPoint


class Oracle(Method):
    """The upper bound: segmentation loss on the labelled target train split."""

    name = "oracle"


METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Method,
        AdaptSegNet,
        AdventMinEnt,
        Advent,
        WeakLabelAdaptation,
        WeakLabelImage,
        WeakLabelPoint,
        Oracle,
    )
}

__all__ = ["METHOD_CLASSES", "Method"]
