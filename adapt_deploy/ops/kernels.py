"""Which implementation the pooling ops use on CUDA tensors: the fused kernels or the reference.

``ADAPT_DEPLOY_KERNELS``: ``auto`` (default) runs a fused CUDA kernel for the (op, dtype) pairs
that bench/kernels.py measured faster than the reference (kernel_choice.py), when a GPU of compute
capability 8.0 or newer is visible and a build is found or can be made (JIT, cached), and the
PyTorch reference otherwise; ``off`` always uses the reference; ``require`` runs every fused
kernel and raises UserError unless they load. Loading is decided once per process, at the first
CUDA call that needs the kernels, and logged in one line on the ``adapt_deploy.ops`` logger;
under ``auto`` one more line per dtype says which ops run which implementation and why. CPU
tensors always use the reference.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from adapt_deploy.errors import UserError
from adapt_deploy.ops import kernel_choice

MODE_ENV = "ADAPT_DEPLOY_KERNELS"
MODES = ("auto", "off", "require")
logger = logging.getLogger("adapt_deploy.ops")


@dataclass(frozen=True)
class KernelStatus:
    """The outcome of the choice: whether the fused kernels serve CUDA tensors, and why."""

    mode: str
    active: bool
    reason: str
    library: Path | None = None
    degraded: bool = False  # a usable GPU is there, but the kernels failed to build or load

    def describe(self) -> str:
        """One line for logs and `adapt-deploy doctor`."""
        if self.active:
            return f"fused CUDA kernels ({self.reason})"
        return f"PyTorch reference ({self.reason})"


def read_mode() -> str:
    """$ADAPT_DEPLOY_KERNELS, lower-cased; UserError for anything but auto, off or require."""
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UserError(
            f"{MODE_ENV}={os.environ.get(MODE_ENV)!r}: expected one of {', '.join(MODES)}"
        )
    return value


def cuda_problem() -> str | None:
    """Why the fused kernels cannot run in this process (no CUDA, old GPU), or None."""
    if torch.version.hip is not None:
        return f"torch {torch.__version__} is a ROCm build; the kernels are CUDA-only"
    if torch.version.cuda is None:
        return f"no CUDA: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__}"
    from adapt_deploy.ops.cuda_build import MIN_CAPABILITY

    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if capability < MIN_CAPABILITY:
            return (
                f"GPU {index} ({torch.cuda.get_device_name(index)}) has compute capability "
                f"{capability[0]}.{capability[1]}; the kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer"
            )
    return None


def _library_loaded() -> bool:
    """Whether the kernel library is already loaded in this process. Until it is, its operator
    does not exist, and the dispatcher raises for it (it does not answer False)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "adapt_deploy_kernels::attention_pool", "CUDA"
        )
    except RuntimeError:  # "operator adapt_deploy_kernels::attention_pool does not exist"
        return False


def _capabilities() -> list[tuple[int, int]]:
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def _load_kernels() -> Path:
    """Load a cached build that runs on the visible GPUs, building one (JIT) if there is none."""
    from adapt_deploy.ops import cuda_build

    found = cuda_build.find_build(_capabilities())
    if found is not None:
        if not _library_loaded():
            torch.ops.load_library(str(found.library))
        return found.library
    logger.info(
        "pooling ops: building the fused CUDA kernels in %s (first use only)",
        cuda_build.cache_root(),
    )
    return cuda_build.build(cuda_build.device_archs()).library


def _resolve(mode: str) -> KernelStatus:
    """Decide (and load) the implementation; UserError in require mode unless it is the kernels."""
    if mode == "off":
        return KernelStatus(mode, False, f"{MODE_ENV}=off")
    problem = cuda_problem()
    if problem is None:
        try:
            library = _load_kernels()
        except (UserError, OSError, RuntimeError) as exc:  # build, cache or dlopen failure
            reason = str(exc) if isinstance(exc, UserError) else f"loading them failed: {exc}"
            if mode == "require":
                raise UserError(f"{MODE_ENV}=require, but {reason}") from exc
            return KernelStatus(mode, False, reason, degraded=True)
        return KernelStatus(mode, True, f"loaded from {library}", library)
    if mode == "require":
        raise UserError(f"{MODE_ENV}=require, but the fused CUDA kernels cannot be used: {problem}")
    return KernelStatus(mode, False, problem)


class _Choice:
    """The process-wide choice, made once under a lock (an error in require mode is kept too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: KernelStatus | None = None
        self._error: UserError | None = None
        self._dtypes_logged: set[torch.dtype] = set()

    def mode(self) -> str:
        """The mode of the choice once made, else the environment's."""
        status = self._status
        return status.mode if status is not None else read_mode()

    def log_dtype_once(self, dtype: torch.dtype, loaded: bool) -> None:
        """Under auto: one line per dtype saying which ops run a fused kernel and why."""
        with self._lock:
            if dtype in self._dtypes_logged:
                return
            self._dtypes_logged.add(dtype)
        fused = [op for op in kernel_choice.OPS if kernel_choice.measured_faster(op, dtype)]
        rest = [op for op in kernel_choice.OPS if op not in fused]
        name = kernel_choice.dtype_name(dtype)
        rule = (
            f"{MODE_ENV}=auto runs a fused kernel only where bench/kernels.py measured it faster "
            f"than the reference ({kernel_choice.MEASURED_ON}); {MODE_ENV}=require runs them all"
        )
        if fused and loaded:
            plan = f"fused CUDA kernels for {', '.join(fused)}"
            plan += f"; PyTorch reference for {', '.join(rest)}" if rest else ""
        elif fused:
            plan = "PyTorch reference for every op (the fused kernels are not in use, see above)"
        else:
            plan = f"PyTorch reference for every op (no fused kernel was measured faster on {name})"
        logger.info("pooling ops on %s CUDA tensors: %s. %s", name, plan, rule)

    @property
    def made(self) -> bool:
        return self._status is not None or self._error is not None

    def status(self) -> KernelStatus:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._status is None:
                try:
                    self._status = _resolve(read_mode())
                except UserError as exc:
                    self._error = exc
                    raise
                level = logging.WARNING if self._status.degraded else logging.INFO
                described = self._status.describe()
                logger.log(level, "pooling ops (lse_pool, attention_pool): %s", described)
            return self._status

    def reset(self) -> None:
        """Forget the choice (tests; the next op call chooses again from the environment)."""
        with self._lock:
            self._status = None
            self._error = None
            self._dtypes_logged.clear()


_CHOICE = _Choice()


def kernel_status() -> KernelStatus:
    """The implementation in use for CUDA tensors, chosen (and built or loaded) on first call."""
    return _CHOICE.status()


def fused_kernels_active() -> bool:
    """Whether CUDA tensors go to the fused kernels (the CUDA registrations ask on every call)."""
    return _CHOICE.status().active


def use_fused(op: str, dtype: torch.dtype) -> bool:
    """Whether ``op`` on CUDA tensors of ``dtype`` runs its fused kernel (asked on every call).

    Under auto, a pair the bench did not measure faster runs the reference without building or
    loading anything; the rest follow the process-wide choice (loading the kernels once).
    """
    if _CHOICE.mode() == "auto":
        any_winner = any(kernel_choice.measured_faster(name, dtype) for name in kernel_choice.OPS)
        loaded = any_winner and _CHOICE.status().active
        _CHOICE.log_dtype_once(dtype, loaded)
        return loaded and kernel_choice.measured_faster(op, dtype)
    return _CHOICE.status().active


def note_reference_use() -> None:
    """Called by the reference on every call: makes the choice where no GPU can change it.

    With mode off or no usable CUDA, the first call logs the line (or raises in require mode);
    where CUDA is usable the choice waits for the first CUDA tensor, so CPU-only use never
    triggers a kernel build.
    """
    if _CHOICE.made:
        _CHOICE.status()  # re-raises a require-mode error
        return
    if read_mode() == "off" or torch.version.cuda is None or not torch.cuda.is_available():
        _CHOICE.status()


def reset() -> None:
    """Forget the choice; for tests that change ADAPT_DEPLOY_KERNELS."""
    _CHOICE.reset()


def _auto_rule(mode: str) -> str:
    """What auto runs of the fused kernels, appended where they are usable."""
    return f"; {MODE_ENV}=auto runs those {kernel_choice.summary()}" if mode == "auto" else ""


def describe() -> tuple[str, bool, str]:
    """(what is used, ok, advice) for `adapt-deploy doctor`, without compiling anything."""
    try:
        mode = read_mode()
    except UserError as exc:
        return (f"invalid {MODE_ENV}", False, str(exc))
    if _CHOICE.made:
        try:
            status = _CHOICE.status()
        except UserError as exc:
            return ("unusable", False, str(exc))
        return (status.describe() + (_auto_rule(status.mode) if status.active else ""), True, "")
    if mode == "off":
        return (f"PyTorch reference ({MODE_ENV}=off)", True, "")
    problem = cuda_problem()
    from adapt_deploy.ops import cuda_build

    if problem is None:
        found = cuda_build.find_build(_capabilities())
        if found is not None:
            return (f"fused CUDA kernels (built in {found.directory}){_auto_rule(mode)}", True, "")
        problem = cuda_build.build_problem()
        if problem is None:
            return (
                f"fused CUDA kernels (not built yet){_auto_rule(mode)}",
                True,
                "built on first use (about a minute) or by `adapt-deploy kernels build`",
            )
    ok = mode != "require"
    advice = "" if ok else f"{MODE_ENV}=require cannot be met"
    return (f"PyTorch reference ({problem})", ok, advice)
