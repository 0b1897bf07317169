"""Which optional part of adapt-deploy a missing module belongs to, and the one line that says how
to install it. The base install runs exported bundles (runtime, stream, verify, build-engine);
training, evaluation of checkpoints, export and on-device adaptation need the [train] extra."""

from __future__ import annotations

from adapt_deploy.errors import UserError

# What `pip install 'adapt-deploy[train]'` adds, by import name (pillow imports as PIL).
TRAIN_MODULES = ("torch", "onnx", "onnxscript", "PIL")
TRAIN_INSTALL = "pip install 'adapt-deploy[train]'"


class MissingExtraError(UserError):
    """A command needs a module of an extra that is not installed."""


def missing_extra(exc: ImportError) -> MissingExtraError | None:
    """The user-facing error for a failed import of the training stack; None for any other
    import error (a bug, or a broken install, which keeps its traceback)."""
    name = (exc.name or "").split(".")[0]
    if name not in TRAIN_MODULES:
        return None
    return MissingExtraError(
        f"this needs the training extra (PyTorch, ONNX), which the base install leaves out "
        f"({name} is not installed); install it with: {TRAIN_INSTALL}"
    )
