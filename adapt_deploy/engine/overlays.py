"""A few predictions drawn over their images, for the run log's evaluations."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from adapt_deploy.config import InputConfig
from adapt_deploy.engine.evaluate import predict_logits
from adapt_deploy.labels import colorize
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.prediction import predicted_classes


def blend(image: np.ndarray, train_ids: np.ndarray, alpha: float) -> np.ndarray:
    """`train_ids` in the Cityscapes palette over an HWC uint8 RGB image, at opacity `alpha`."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(train_ids)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


@torch.no_grad()
def prediction_overlays(
    model: DeepLab, dataset: Dataset, spec: InputConfig, count: int = 3, alpha: float = 0.5
) -> list[np.ndarray]:
    """The model's predictions on the first `count` items of `dataset` (items as
    SegmentationDataset gives them: `image` uint8 (3, H, W) RGB), at each image's size,
    blended over it: HWC uint8 RGB arrays. The model runs in eval mode and is left in the mode
    it came in."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        overlays = []
        for index in range(min(count, len(dataset))):  # type: ignore[arg-type]
            image = dataset[index]["image"]
            logits = predict_logits(model, image[None].to(device), spec, image.shape[-2:])
            train_ids = predicted_classes(logits)[0].cpu().numpy()
            overlays.append(blend(image.permute(1, 2, 0).numpy(), train_ids, alpha))
        return overlays
    finally:
        model.train(was_training)
