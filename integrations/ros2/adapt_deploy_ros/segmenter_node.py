"""The ROS 2 node: sensor_msgs/Image in; labels (mono8), colour overlay (rgb8) and class
presence (std_msgs/Float32MultiArray) out, each stamped with the input's header.

Topics (relative, so namespaces and remapping apply):
  image     sensor_msgs/Image            subscribed (rgb8, bgr8, rgba8, bgra8, mono8)
  labels    sensor_msgs/Image            mono8, pixel = trainId, at the input's size
  overlay   sensor_msgs/Image            rgb8 class colours blended over the input (only
                                         computed while something subscribes)
  presence  std_msgs/Float32MultiArray   per-class presence in [0, 1], dimension "classes"
  classes   std_msgs/String              JSON list of class names (transient local, once)
Parameters: bundle (required), backend ("auto"), device ("0", "cuda:N" or "cpu"),
precision ("auto"), overlay_alpha (0.5), publish_overlay (true).

rclpy and the message packages are imported in `main`, so this module imports (and its
`process_image` is tested) without ROS; run without a sourced ROS 2 it exits with a message
saying so.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy_ros.conversions import image_msg_to_array

NODE_NAME = "adapt_deploy_segmenter"
ROS_MISSING = (
    "adapt_deploy_ros needs ROS 2 (rclpy, sensor_msgs, std_msgs), which this Python cannot "
    "import ({error}); source your ROS 2 installation first, e.g. "
    "`source /opt/ros/jazzy/setup.bash`, then `source install/setup.bash` of your workspace"
)


@dataclass
class Outputs:
    """What one input image produces."""

    labels: np.ndarray  # (H, W) uint8
    overlay: np.ndarray | None  # (H, W, 3) uint8 RGB
    presence: np.ndarray  # (C,) float32
    timings: dict[str, float]


def process_image(segmenter: Any, msg: Any, table: np.ndarray, alpha: float | None) -> Outputs:
    """Segment one Image message; the overlay only when `alpha` is given."""
    from adapt_deploy.runtime import overlay

    frame = image_msg_to_array(msg)
    result = segmenter(frame)
    blended = None if alpha is None else overlay(frame, result.labels, table, alpha)
    return Outputs(result.labels, blended, result.presence, result.timings)


def _import_ros() -> dict[str, Any]:
    try:
        import rclpy
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float32MultiArray, MultiArrayDimension, MultiArrayLayout, String
    except ImportError as exc:
        raise SystemExit(ROS_MISSING.format(error=exc)) from None
    return {
        "rclpy": rclpy,
        "QoSProfile": QoSProfile,
        "ReliabilityPolicy": ReliabilityPolicy,
        "DurabilityPolicy": DurabilityPolicy,
        "Image": Image,
        "Float32MultiArray": Float32MultiArray,
        "MultiArrayDimension": MultiArrayDimension,
        "MultiArrayLayout": MultiArrayLayout,
        "String": String,
    }


class SegmenterNode:
    """The node's wiring: parameters, a Segmenter, one subscription and four publishers."""

    def __init__(self, ros: dict[str, Any]) -> None:
        from adapt_deploy_ros.conversions import (
            labels_to_mono8_msg,
            presence_to_multiarray,
            rgb_to_rgb8_msg,
        )

        self.ros = ros
        self._to_labels, self._to_rgb = labels_to_mono8_msg, rgb_to_rgb8_msg
        self._to_presence = presence_to_multiarray
        self.segmenter: Any = None
        self.node = ros["rclpy"].create_node(NODE_NAME)
        try:
            self._setup(ros, self.node)
        except BaseException:  # the Segmenter (a GPU session, maybe) and the node go back now
            self.close()
            raise

    def _setup(self, ros: dict[str, Any], node: Any) -> None:
        """Parameters, the Segmenter, publishers and the subscription."""
        from adapt_deploy.runtime import Segmenter, colour_table

        for name, default in (
            ("bundle", ""),
            ("backend", "auto"),
            ("device", "0"),
            ("precision", "auto"),
            ("overlay_alpha", 0.5),
            ("publish_overlay", True),
        ):
            node.declare_parameter(name, default)
        param = {name: node.get_parameter(name).value for name in ("bundle", "backend", "device")}
        if not param["bundle"]:
            raise SystemExit(f"{NODE_NAME}: set the 'bundle' parameter to an exported bundle")
        self.segmenter = Segmenter.from_bundle(
            param["bundle"],
            backend=param["backend"],
            device=param["device"],  # "0", "cuda:1", "cpu" (parse_device reads them)
            precision=node.get_parameter("precision").value,
        )
        node.get_logger().info(f"{self.segmenter}; {'; '.join(self.segmenter.notes)}")
        self.table = colour_table(self.segmenter.palette)
        alpha = float(node.get_parameter("overlay_alpha").value)
        self.alpha = alpha if node.get_parameter("publish_overlay").value else None

        qos = ros["QoSProfile"]
        latest = qos(depth=1, reliability=ros["ReliabilityPolicy"].BEST_EFFORT)
        latched = qos(depth=1, durability=ros["DurabilityPolicy"].TRANSIENT_LOCAL)
        self.pub_labels = node.create_publisher(ros["Image"], "labels", 1)
        self.pub_overlay = node.create_publisher(ros["Image"], "overlay", 1)
        self.pub_presence = node.create_publisher(ros["Float32MultiArray"], "presence", 1)
        self.pub_classes = node.create_publisher(ros["String"], "classes", latched)
        self.pub_classes.publish(ros["String"](data=json.dumps(self.segmenter.classes)))
        self.subscription = node.create_subscription(ros["Image"], "image", self.on_image, latest)

    def on_image(self, msg: Any) -> None:
        ros = self.ros
        wanted = self.alpha is not None and self.pub_overlay.get_subscription_count() > 0
        try:
            out = process_image(self.segmenter, msg, self.table, self.alpha if wanted else None)
        except Exception as exc:  # a bad message must not take the node down
            self.node.get_logger().error(f"dropped an image: {exc}")
            return
        self.pub_labels.publish(self._to_labels(out.labels, msg.header, ros["Image"]))
        if out.overlay is not None:
            self.pub_overlay.publish(self._to_rgb(out.overlay, msg.header, ros["Image"]))
        presence = self._to_presence(
            out.presence,
            ros["Float32MultiArray"],
            ros["MultiArrayLayout"],
            ros["MultiArrayDimension"],
        )
        self.pub_presence.publish(presence)

    def close(self) -> None:
        if self.segmenter is not None:
            self.segmenter.close()
            self.segmenter = None
        self.node.destroy_node()


def main(args: list[str] | None = None) -> None:
    """Entry point of `ros2 run adapt_deploy_ros segmenter_node`."""
    ros = _import_ros()
    rclpy = ros["rclpy"]
    rclpy.init(args=args if args is not None else sys.argv)
    node = None
    try:
        node = SegmenterNode(ros)
        rclpy.spin(node.node)
    except KeyboardInterrupt:
        pass
    except UserError as exc:  # a wrong bundle path or parameter: one line, no traceback
        raise SystemExit(f"{NODE_NAME}: {exc}") from None
    finally:
        if node is not None:
            node.close()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()
