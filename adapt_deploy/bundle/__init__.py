"""The deployment bundle as files: meta.json's schema and hashes, engine files and their names,
and which TensorRT and GPU this machine has. Torch-free: the runtime, export and tta all stand
on it."""
