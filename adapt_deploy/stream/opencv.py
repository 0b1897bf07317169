"""OpenCV for the stream, with OpenCV's and FFmpeg's own log lines off.

Opening a file that is not a video, or writing to a full disk, makes OpenCV print `[ WARN:0@..]`
lines and FFmpeg print `[mov,mp4,...] moov atom not found` to stderr before the tool's own
one-line error, which already says what went wrong. Both libraries read these variables lazily
(at their first message and when the FFmpeg backend starts), so setting them before the first
capture or writer is enough; a user's own setting is kept, for debugging.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

import cv2

__all__ = ["cv2"]
