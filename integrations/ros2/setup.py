"""ament_python build of the adapt_deploy_ros package (colcon build --packages-select ...)."""

from glob import glob

from setuptools import setup

PACKAGE = "adapt_deploy_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml", "README.md"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="adapt-deploy maintainers",
    maintainer_email="adapt-deploy@example.com",
    description="ROS 2 node running an adapt-deploy segmentation bundle",
    license="MIT",
    entry_points={"console_scripts": [f"segmenter_node = {PACKAGE}.segmenter_node:main"]},
)
