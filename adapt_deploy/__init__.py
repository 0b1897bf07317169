"""adapt-deploy: domain-adaptive semantic segmentation, from training to deployment."""

__version__ = "0.2.0"
