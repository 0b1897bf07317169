"""Launch the adapt_deploy segmenter node.

    ros2 launch adapt_deploy_ros segmenter.launch.py bundle:=/path/to/bundle \
        image:=/camera/image_raw [backend:=auto] [device:=0] [precision:=auto] [namespace:=seg]
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

ARGUMENTS = {
    "bundle": ("", "exported bundle directory (adapt-deploy export)"),
    "image": ("image", "input sensor_msgs/Image topic"),
    "backend": ("auto", "auto | onnxruntime | tensorrt | torch"),
    "device": ("0", "GPU index, cuda:N (required) or cpu"),
    "precision": ("auto", "auto | fp32 | fp16"),
    "overlay_alpha": ("0.5", "weight of the class colours in the overlay"),
    "publish_overlay": ("true", "publish the rgb8 overlay"),
    "namespace": ("adapt_deploy", "namespace of the node's output topics"),
}


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=text)
        for name, (default, text) in ARGUMENTS.items()
    ]
    node = Node(
        package="adapt_deploy_ros",
        executable="segmenter_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            {
                "bundle": LaunchConfiguration("bundle"),
                "backend": LaunchConfiguration("backend"),
                # a string parameter: "0" would otherwise be read as an int
                "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                "precision": LaunchConfiguration("precision"),
                # a double parameter: "1" would otherwise be read as an int
                "overlay_alpha": ParameterValue(
                    LaunchConfiguration("overlay_alpha"), value_type=float
                ),
                "publish_overlay": LaunchConfiguration("publish_overlay"),
            }
        ],
        remappings=[("image", LaunchConfiguration("image"))],
    )
    return LaunchDescription([*declared, node])
