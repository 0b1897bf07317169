"""The ROS 2 package's message conversions and image handling, without ROS.

integrations/ros2 is a colcon package, not part of adapt_deploy: its Python package is put on the
path here. Messages are dicts and plain objects with the sensor_msgs/Image fields.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from adapt_deploy.errors import UserError
from adapt_deploy.runtime import Segmenter, colour_table

ROS2 = Path(__file__).resolve().parents[1] / "integrations" / "ros2"
sys.path.insert(0, str(ROS2))

from adapt_deploy_ros import segmenter_node  # noqa: E402
from adapt_deploy_ros.conversions import (  # noqa: E402
    ImageMessageError,
    array_to_image_fields,
    image_msg_to_array,
    labels_to_mono8_msg,
    presence_to_multiarray,
    rgb_to_rgb8_msg,
)
from adapt_deploy_ros.segmenter_node import process_image  # noqa: E402

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)


def message(pixels: np.ndarray, encoding: str, pad: int = 0, kind=dict):
    """An Image message of `pixels` (rows as stored) with `pad` bytes of padding per row."""
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    padded = np.concatenate([rows, np.full((height, pad), 99, np.uint8)], axis=1)
    fields = {"height": height, "width": width, "encoding": encoding, "is_bigendian": 0}
    return kind(**fields, step=padded.shape[1], data=padded.tobytes())


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("kind", [dict, SimpleNamespace])
def test_every_encoding_reads_as_rgb(pad: int, kind):
    alpha = np.full((5, 7, 1), 200, np.uint8)
    stored = {
        "rgb8": RGB,
        "bgr8": RGB[:, :, ::-1],
        "rgba8": np.concatenate([RGB, alpha], axis=2),
        "bgra8": np.concatenate([RGB[:, :, ::-1], alpha], axis=2),
    }
    for encoding, pixels in stored.items():
        got = image_msg_to_array(message(pixels, encoding, pad, kind))
        assert got.shape == (5, 7, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, RGB, err_msg=encoding)
    grey = image_msg_to_array(message(RGB[:, :, 0], "mono8", pad, kind))
    np.testing.assert_array_equal(grey, RGB[:, :, 0])


def test_data_may_be_a_list_or_an_array_of_bytes():
    import array

    msg = message(RGB, "rgb8")
    for data in (list(msg["data"]), array.array("B", msg["data"]), bytearray(msg["data"])):
        np.testing.assert_array_equal(image_msg_to_array({**msg, "data": data}), RGB)


def test_bad_messages_name_the_problem():
    msg = message(RGB, "rgb8")
    with pytest.raises(ImageMessageError, match=r"'16UC1' is not supported: expected one of"):
        image_msg_to_array({**msg, "encoding": "16UC1"})
    with pytest.raises(ImageMessageError, match="step 20 and 105 data bytes"):
        image_msg_to_array({**msg, "step": 20})
    with pytest.raises(ImageMessageError, match="step 21 and 100 data bytes"):
        image_msg_to_array({**msg, "data": msg["data"][:100]})
    with pytest.raises(ImageMessageError, match="no field 'encoding'"):
        image_msg_to_array({k: v for k, v in msg.items() if k != "encoding"})
    assert issubclass(ImageMessageError, UserError)


def test_labels_and_overlay_messages_round_trip():
    labels = np.random.default_rng(1).integers(0, 19, (4, 6), np.uint8)
    header = {"stamp": 12, "frame_id": "camera"}
    msg = labels_to_mono8_msg(labels, header)
    assert msg["encoding"] == "mono8" and msg["step"] == 6 and msg["header"] is header
    assert (msg["height"], msg["width"], msg["is_bigendian"]) == (4, 6, 0)
    np.testing.assert_array_equal(image_msg_to_array(msg), labels)
    rgb = rgb_to_rgb8_msg(RGB, msg_type=SimpleNamespace)
    assert rgb.encoding == "rgb8" and rgb.step == 21 and not hasattr(rgb, "header")
    np.testing.assert_array_equal(image_msg_to_array(rgb), RGB)
    with pytest.raises(ImageMessageError, match="cannot write a int32 array"):
        labels_to_mono8_msg(labels.astype(np.int32))
    with pytest.raises(ImageMessageError, match=r"shape \(5, 7, 3\) as 'mono8'"):
        array_to_image_fields(RGB, "mono8")


def test_presence_message():
    msg = presence_to_multiarray(np.array([0.25, 0.5, 1.0], np.float32))
    assert msg["layout"] == {
        "dim": [{"label": "classes", "size": 3, "stride": 3}],
        "data_offset": 0,
    }
    assert list(msg["data"]) == [0.25, 0.5, 1.0]


def test_process_image_segments_a_message(tiny_bundle: Path):
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), np.uint8)
    with Segmenter.from_bundle(tiny_bundle) as seg:
        out = process_image(
            seg, message(image[:, :, ::-1], "bgr8", pad=4), colour_table(seg.palette), 0.5
        )
        np.testing.assert_array_equal(out.labels, seg(image).labels)
        assert out.overlay.shape == (40, 60, 3) and out.presence.shape == (19,)
        grey = process_image(seg, message(image[:, :, 0], "mono8"), colour_table(seg.palette), None)
        assert grey.overlay is None and grey.labels.shape == (40, 60)


def test_node_without_ros_says_to_source_it():
    code = (
        "import sys; sys.modules['rclpy'] = None\n"
        "from adapt_deploy_ros import segmenter_node\n"
        "segmenter_node.main([])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROS2)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "needs ROS 2" in result.stderr and "source /opt/ros/" in result.stderr


# --------------------------------------------------------------------------------------------
# The node's wiring against a stand-in for rclpy
# --------------------------------------------------------------------------------------------


class FakePublisher:
    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.sent: list = []

    def get_subscription_count(self) -> int:
        return self.subscribers

    def publish(self, msg) -> None:
        self.sent.append(msg)


class FakeNode:
    """What SegmenterNode uses of an rclpy node; `fail_on` names a publisher that fails."""

    def __init__(self, params: dict, subscribers: int = 0, fail_on: str | None = None) -> None:
        self.params, self.subscribers, self.fail_on = params, subscribers, fail_on
        self.publishers: dict[str, FakePublisher] = {}
        self.destroyed = False

    def declare_parameter(self, name, default):
        self.params.setdefault(name, default)

    def get_parameter(self, name):
        return SimpleNamespace(value=self.params[name])

    def get_logger(self):
        return SimpleNamespace(info=lambda text: None, error=lambda text: None)

    def create_publisher(self, msg_type, topic, qos):
        if topic == self.fail_on:
            raise RuntimeError(f"cannot create the {topic} publisher")
        self.publishers[topic] = FakePublisher(self.subscribers)
        return self.publishers[topic]

    def create_subscription(self, msg_type, topic, callback, qos):
        return SimpleNamespace(topic=topic, callback=callback)

    def destroy_node(self):
        self.destroyed = True


def fake_ros(node: FakeNode) -> dict:
    rclpy = SimpleNamespace(
        init=lambda args: None,
        create_node=lambda name: node,
        spin=lambda n: None,
        ok=lambda: True,
        shutdown=lambda: None,
    )
    qos = SimpleNamespace(BEST_EFFORT=1, TRANSIENT_LOCAL=1)
    return {
        "rclpy": rclpy,
        "QoSProfile": lambda **kwargs: kwargs,
        "ReliabilityPolicy": qos,
        "DurabilityPolicy": qos,
        "Image": dict,
        "Float32MultiArray": dict,
        "MultiArrayDimension": dict,
        "MultiArrayLayout": dict,
        "String": dict,
    }


def test_node_with_a_bad_bundle_exits_with_one_line(tmp_path: Path, monkeypatch):
    node = FakeNode({"bundle": str(tmp_path / "missing")})
    monkeypatch.setattr(segmenter_node, "_import_ros", lambda: fake_ros(node))
    with pytest.raises(SystemExit) as exited:
        segmenter_node.main([])
    message = str(exited.value.code)
    assert message.startswith(segmenter_node.NODE_NAME) and "missing" in message
    assert "\n" not in message and node.destroyed


def test_node_closes_its_segmenter_when_setup_fails(tiny_bundle: Path, monkeypatch):
    opened: list[Segmenter] = []
    real = Segmenter.from_bundle.__func__

    def from_bundle(cls, *args, **kwargs):
        opened.append(real(cls, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Segmenter, "from_bundle", classmethod(from_bundle))
    node = FakeNode({"bundle": str(tiny_bundle), "device": "cpu"}, fail_on="presence")
    with pytest.raises(RuntimeError, match="presence publisher"):
        segmenter_node.SegmenterNode(fake_ros(node))
    assert len(opened) == 1 and opened[0]._impl is None and node.destroyed


def test_node_blends_the_overlay_only_for_subscribers(tiny_bundle: Path):
    image = np.random.default_rng(3).integers(0, 256, (40, 60, 3), np.uint8)
    msg = SimpleNamespace(**message(image, "rgb8"), header={"frame_id": "camera"})
    for subscribers, overlays in ((0, 0), (1, 1)):
        node = FakeNode({"bundle": str(tiny_bundle), "device": "0"}, subscribers)
        wired = segmenter_node.SegmenterNode(fake_ros(node))
        try:
            wired.on_image(msg)
        finally:
            wired.close()
        sent = {topic: len(p.sent) for topic, p in node.publishers.items()}
        assert sent == {"labels": 1, "overlay": overlays, "presence": 1, "classes": 1}
