"""Checkpoint → deployment bundle: ONNX export, fp16, parity gates, bundle files, verification.

Modules that run on the target (bundle, verify, precision) import neither torch nor cv2; the
exporter (onnx_export, parity, pipeline) needs torch. This package imports nothing eagerly.
"""
