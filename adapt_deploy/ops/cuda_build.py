"""Build and find the fused CUDA kernels (``adapt_deploy/cuda_kernels``) with torch's JIT.

Each build has its own directory under the cache, named by the torch and CUDA versions, the GPU
architectures and a hash of the sources, with a manifest (``build.json``) saying what it holds.
``find_build`` looks for one that runs on given GPUs and needs no compiler; ``build`` compiles
one with ``torch.utils.cpp_extension.load`` (nvcc and ninja required) and loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapt_deploy.atomic import atomic_write_json
from adapt_deploy.errors import UserError

KERNELS_DIR = Path(__file__).resolve().parent.parent / "cuda_kernels"
EXTENSION = "adapt_deploy_kernels"
CACHE_ENV = "ADAPT_DEPLOY_KERNELS_CACHE"
MANIFEST = "build.json"
MIN_CAPABILITY = (8, 0)
# Built when no GPU is visible and nothing else is asked for (an image build): Ampere to Hopper,
# with PTX so that newer GPUs JIT-compile it.
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0+PTX")
_ARCH = re.compile(r"^(\d+)\.(\d+)(\+PTX)?$")


@dataclass(frozen=True)
class Build:
    """A built kernel library and the architectures it holds code for."""

    directory: Path
    library: Path
    archs: tuple[str, ...]


def sources() -> list[Path]:
    """What the JIT compiles: every .cu file and the torch binding."""
    return [*sorted(KERNELS_DIR.glob("*.cu")), KERNELS_DIR / "bindings.cpp"]


def source_digest() -> str:
    """SHA-256 over every kernel source and header, so an edited kernel gets a new build."""
    digest = hashlib.sha256()
    for path in sorted(KERNELS_DIR.iterdir()):
        if path.suffix in {".cu", ".cuh", ".h", ".cpp"}:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_root() -> Path:
    """$ADAPT_DEPLOY_KERNELS_CACHE, else $XDG_CACHE_HOME/adapt_deploy/kernels (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapt_deploy" / "kernels"


def parse_archs(text: str, source: str = "--arch") -> tuple[str, ...]:
    """'8.0;9.0+PTX' (';', ',' or spaces between) -> ('8.0', '9.0+PTX'); sm_80 at least."""
    archs = tuple(item for item in re.split(r"[;,\s]+", text.strip()) if item)
    if not archs:
        raise UserError(f"{source}: expected GPU architectures such as '8.0;9.0+PTX', got {text!r}")
    for arch in archs:
        match = _ARCH.match(arch)
        if match is None:
            raise UserError(
                f"{source}: expected architectures like '8.6' or '9.0+PTX', got {arch!r}"
            )
        if (int(match[1]), int(match[2])) < MIN_CAPABILITY:
            raise UserError(
                f"{source}: {arch} is older than the kernels' minimum compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere)"
            )
    return archs


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """nvcc -gencode flags: SASS for each architecture, plus PTX for those marked +PTX."""
    flags = []
    for arch in archs:
        match = _ARCH.match(arch)
        if match is None:
            raise ValueError(f"not an architecture: {arch!r}")
        number = f"{match[1]}{match[2]}"
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match[3]:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def nvcc_flags() -> list[str]:
    """Ours on top of torch's JIT flags (which add -std=c++20 and the __CUDA_NO_HALF* macros)."""
    return ["-O3", "-lineinfo"]


def covers(archs: Sequence[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of ``capability``.

    SASS runs on its own architecture; PTX is compiled by the driver for the same or newer GPUs.
    """
    for arch in archs:
        match = _ARCH.match(arch)
        if match is None:
            continue
        version = (int(match[1]), int(match[2]))
        if version == capability or (match[3] and version <= capability):
            return True
    return False


def device_archs() -> tuple[str, ...]:
    """The visible GPUs' architectures, the newest with +PTX, capped at what torch was built for."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    built = [int(m[1]) for a in torch.cuda.get_arch_list() if (m := re.match(r"sm_(\d+)", a))]
    if built:
        top = max(built)
        caps = sorted({min(cap, (top // 10, top % 10)) for cap in caps})
    archs = [f"{major}.{minor}" for major, minor in caps]
    if not archs:
        return DEFAULT_ARCHS
    archs[-1] += "+PTX"
    return tuple(archs)


def build_problem() -> str | None:
    """Why this environment cannot compile the kernels, or None when it can."""
    if torch.version.hip is not None:
        return f"torch {torch.__version__} is a ROCm build; the kernels are CUDA-only"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin").exists():
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def build_dir(archs: Sequence[str], root: Path | None = None) -> Path:
    """The cache directory of a build for ``archs`` of the current sources and torch."""
    tag = "_".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    name = f"torch{torch.__version__}-cuda{torch.version.cuda}-{tag}-{source_digest()[:12]}"
    return (root or cache_root()) / name


def _read_manifest(directory: Path) -> Build | None:
    """The build in ``directory`` if its manifest matches this torch and these sources."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
        library = directory / data["library"]
        archs = tuple(data["archs"])
        matches = (
            data["torch"] == torch.__version__
            and data["cuda"] == torch.version.cuda
            and data["digest"] == source_digest()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Build(directory, library, archs) if matches and library.is_file() else None


def _write_manifest(build: Build) -> None:
    """build.json beside the library, written to a temporary file and renamed."""
    data = {
        "library": build.library.name,
        "archs": list(build.archs),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "digest": source_digest(),
    }
    atomic_write_json(build.directory / MANIFEST, data)


def find_build(capabilities: Sequence[tuple[int, int]], root: Path | None = None) -> Build | None:
    """A finished build of the current sources for this torch that runs on every capability."""
    base = root or cache_root()
    if not base.is_dir():
        return None
    for manifest in sorted(base.glob(f"*/{MANIFEST}")):
        found = _read_manifest(manifest.parent)
        if found is not None and all(covers(found.archs, cap) for cap in capabilities):
            return found
    return None


def requested_archs(archs: str | None = None) -> tuple[str, ...]:
    """``archs`` if given, else $TORCH_CUDA_ARCH_LIST, else the visible GPUs, else the default."""
    if archs:
        return parse_archs(archs)
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return parse_archs(os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST")
    if torch.version.cuda is not None and torch.cuda.is_available():
        return device_archs()
    return DEFAULT_ARCHS


def build(
    archs: Sequence[str] | None = None, root: Path | None = None, verbose: bool = False
) -> Build:
    """Compile (or reuse) the kernels for ``archs`` and load them; UserError says what failed."""
    problem = build_problem()
    if problem is not None:
        raise UserError(f"cannot build the CUDA kernels: {problem}")
    archs = tuple(archs) if archs else requested_archs()
    directory = build_dir(archs, root)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the kernel cache {directory}: {exc.strerror or exc}; "
            f"point {CACHE_ENV} at a writable directory"
        ) from exc
    from torch.utils import cpp_extension

    try:
        library = cpp_extension.load(
            name=EXTENSION,
            sources=[str(path) for path in sources()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags() + gencode_flags(archs),
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler, linker or loader: one line, the log is in the directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"building the CUDA kernels in {directory} failed: {first} "
            "(`adapt-deploy kernels build --verbose` shows the compiler output)"
        ) from exc
    result = Build(directory, Path(library), archs)
    try:
        _write_manifest(result)
    except OSError as exc:
        raise UserError(f"cannot write {directory / MANIFEST}: {exc.strerror or exc}") from exc
    return result
