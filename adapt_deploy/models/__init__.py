"""Segmentation networks: ResNet backbones and DeepLab-v2."""

from adapt_deploy.models.deeplab import DeepLab

__all__ = ["DeepLab"]
