"""The runtime: a bundle's model behind `Segmenter(frame) -> Segmentation`, on ONNX Runtime,
TensorRT or PyTorch. Importing it needs neither torch nor OpenCV."""

from adapt_deploy.runtime.colors import colorize, colour_table, overlay
from adapt_deploy.runtime.frames import FrameError
from adapt_deploy.runtime.segmenter import Segmentation, Segmenter

__all__ = ["FrameError", "Segmentation", "Segmenter", "colorize", "colour_table", "overlay"]
