"""What is installed and which backends work: the facts `adapt-deploy doctor` prints."""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata

from adapt_deploy.errors import UserError
from adapt_deploy.extras import TRAIN_INSTALL
from adapt_deploy.runtime.graph_policy import GRAPHS_ENV, graphs_env_off
from adapt_deploy.runtime.stream_priority import STREAMS_ENV, adapter_stream_setting

ENV_PREFIX = "ADAPT_DEPLOY_"
# The process-wide switches read from the environment, each with the parser that checks its
# value where it has one here (ADAPT_DEPLOY_KERNELS is checked by the kernels line; the cache
# is any directory).
ENV_CHECKS: dict[str, Callable[[Mapping[str, str]], object] | None] = {
    GRAPHS_ENV: graphs_env_off,
    STREAMS_ENV: adapter_stream_setting,
    "ADAPT_DEPLOY_KERNELS": None,
    "ADAPT_DEPLOY_KERNELS_CACHE": None,
}


@dataclass
class Check:
    """One line of the report: a component, what was found, and whether it is a problem."""

    name: str
    found: str
    ok: bool = True
    advice: str = ""


def installed_version(distribution: str) -> str | None:
    """The installed version of a PyPI distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_conflict() -> str | None:
    """A plain warning when both onnxruntime flavours are installed (they share one module)."""
    cpu, gpu = installed_version("onnxruntime"), installed_version("onnxruntime-gpu")
    if cpu and gpu:
        return (
            f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed; they install the "
            "same `onnxruntime` module and overwrite each other. Keep one: "
            "`pip uninstall -y onnxruntime onnxruntime-gpu` then install the one you want."
        )
    return None


def _module_version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken install is reported as missing, with no traceback
        return None
    return str(getattr(mod, "__version__", "installed"))


def _kernels_check() -> Check:
    """Which implementation the pooling ops use on CUDA tensors (never compiles anything)."""
    try:
        from adapt_deploy.ops.kernels import describe

        found, ok, advice = describe()
    except Exception as exc:  # a broken install is reported, never a traceback
        return Check("cuda kernels", "unknown", False, f"{type(exc).__name__}: {exc}")
    return Check("cuda kernels", found, ok, advice)


def environment_check(environ: Mapping[str, str] | None = None) -> Check:
    """The ADAPT_DEPLOY_* variables set: each value checked where a parser exists, a name the
    package does not read (a typo) named, since it would be ignored without a word."""
    environ = os.environ if environ is None else environ
    found, problems = [], []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX)):
        found.append(f"{name}={environ[name]}")
        if name not in ENV_CHECKS:
            problems.append(f"{name} is not read by adapt-deploy (known: {', '.join(ENV_CHECKS)})")
            continue
        parse = ENV_CHECKS[name]
        try:
            if parse is not None:
                parse(environ)
        except UserError as exc:
            problems.append(str(exc))
    return Check("environment", ", ".join(found) or "no ADAPT_DEPLOY_* set", not problems,
                 "; ".join(problems))  # fmt: skip


def run_checks() -> list[Check]:
    """Inspect the environment; never raises."""
    checks = [Check("python", platform.python_version())]
    torch_version = _module_version("torch")
    checks.append(
        Check(
            "torch",
            torch_version or "missing",
            True,  # a base install runs bundles without it
            f"training and export: {TRAIN_INSTALL}" if torch_version is None else "",
        )
    )
    if torch_version:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else "none (CPU only)"
        checks.append(Check("torch CUDA", gpu))
        checks.append(_kernels_check())
    cv2_version = _module_version("cv2")
    checks.append(
        Check(
            "cv2",
            cv2_version or "missing",
            cv2_version is not None,
            "pip install opencv-python-headless" if cv2_version is None else "",
        )
    )
    onnx_version = _module_version("onnx")
    checks.append(
        Check(
            "onnx",
            onnx_version or "missing",
            True,  # export and on-device adaptation read it; running a bundle does not
            f"export: {TRAIN_INSTALL}" if onnx_version is None else "",
        )
    )
    conflict = onnxruntime_conflict()
    ort = _module_version("onnxruntime")
    if conflict:
        checks.append(Check("onnxruntime", "both flavours installed", False, conflict))
    elif ort:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        checks.append(Check("onnxruntime", f"{ort} ({providers})"))
    else:
        checks.append(Check("onnxruntime", "missing", True, "pip install 'adapt-deploy[cpu]'"))
    trt = _module_version("tensorrt")
    checks.append(
        Check(
            "tensorrt",
            trt or "missing",
            True,
            "" if trt else "on a GPU machine: pip install 'adapt-deploy[trt]'",
        )
    )
    cuda_python = installed_version("cuda-python")
    checks.append(Check("cuda-python", cuda_python or "missing"))
    checks.append(environment_check())
    return checks
