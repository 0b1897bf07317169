"""ROS 2 node wrapping adapt_deploy's Segmenter (sensor_msgs/Image in, labels and overlay out)."""
