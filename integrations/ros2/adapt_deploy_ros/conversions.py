"""sensor_msgs/Image and std_msgs/Float32MultiArray <-> numpy, without ROS.

Plain functions on duck-typed messages: anything with the Image fields (height, width,
encoding, step, data) as attributes or dict keys, so they are tested without ROS installed.
Messages are built by `msg_type(**fields)`: the node passes sensor_msgs.msg.Image and friends,
tests pass dict. Supported encodings: rgb8, bgr8, rgba8, bgra8, mono8 (8 bits per channel).
"""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class ImageMessageError(UserError):
    """An Image message with an unsupported encoding or inconsistent size fields."""


def _get(msg: Any, name: str) -> Any:
    if isinstance(msg, dict):
        if name not in msg:
            raise ImageMessageError(f"Image message has no field {name!r}")
        return msg[name]
    try:
        return getattr(msg, name)
    except AttributeError:
        raise ImageMessageError(f"Image message has no field {name!r}") from None


def image_msg_to_array(msg: Any) -> np.ndarray:
    """The image as uint8 RGB (H, W, 3), or (H, W) for mono8: a view of the message's data
    where possible (row padding in `step` skipped, BGR(A) reordered and alpha dropped)."""
    encoding = str(_get(msg, "encoding"))
    if encoding not in CHANNELS:
        raise ImageMessageError(
            f"Image encoding {encoding!r} is not supported: expected one of {list(CHANNELS)}"
        )
    height, width, step = (int(_get(msg, k)) for k in ("height", "width", "step"))
    channels = CHANNELS[encoding]
    data = _get(msg, "data")
    buffer = np.asarray(data, np.uint8) if isinstance(data, list) else np.frombuffer(data, np.uint8)
    row = width * channels
    if height < 1 or width < 1 or step < row or buffer.size < step * height:
        raise ImageMessageError(
            f"Image {encoding} {width}x{height}: step {step} and {buffer.size} data bytes do "
            f"not hold {height} rows of {row} bytes (step must be >= width * {channels})"
        )
    rows = buffer[: step * height].reshape(height, step)[:, :row]
    if channels == 1:
        return rows
    pixels = rows.reshape(height, width, channels)
    return pixels[:, :, 2::-1] if encoding.startswith("bgr") else pixels[:, :, :3]


def array_to_image_fields(image: np.ndarray, encoding: str) -> dict[str, Any]:
    """height, width, encoding, is_bigendian, step and data of an Image holding `image`
    ((H, W) for mono8, (H, W, 3) for rgb8/bgr8, (H, W, 4) for rgba8/bgra8), rows unpadded."""
    channels = CHANNELS.get(encoding)
    expected = (2,) if channels == 1 else (3,)
    if (
        channels is None
        or image.dtype != np.uint8
        or image.ndim not in expected
        or (image.ndim == 3 and image.shape[2] != channels)
    ):
        raise ImageMessageError(
            f"cannot write a {image.dtype} array of shape {image.shape} as {encoding!r} "
            f"(supported: {list(CHANNELS)}, uint8, (H, W) for mono8, (H, W, C) otherwise)"
        )
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(image).tobytes())
    height, width = image.shape[:2]
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "is_bigendian": 0,
        "step": width * channels,
        "data": data,
    }


def labels_to_mono8_msg(
    labels: np.ndarray, header: Any = None, msg_type: Callable[..., Any] = dict
) -> Any:
    """A mono8 Image of a (H, W) uint8 label map (pixel value = trainId)."""
    fields = array_to_image_fields(labels, "mono8")
    return msg_type(**fields) if header is None else msg_type(header=header, **fields)


def rgb_to_rgb8_msg(
    image: np.ndarray, header: Any = None, msg_type: Callable[..., Any] = dict
) -> Any:
    """An rgb8 Image of a (H, W, 3) uint8 RGB image (the colour overlay)."""
    fields = array_to_image_fields(image, "rgb8")
    return msg_type(**fields) if header is None else msg_type(header=header, **fields)


def presence_to_multiarray(
    presence: np.ndarray,
    array_type: Callable[..., Any] = dict,
    layout_type: Callable[..., Any] = dict,
    dim_type: Callable[..., Any] = dict,
) -> Any:
    """A Float32MultiArray of per-class presence: one dimension labelled "classes"."""
    values = np.asarray(presence, np.float32).reshape(-1)
    data = array.array("f")
    data.frombytes(values.tobytes())
    dim = dim_type(label="classes", size=values.size, stride=values.size)
    return array_type(layout=layout_type(dim=[dim], data_offset=0), data=data)
