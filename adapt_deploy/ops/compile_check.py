"""Compile check of the CUDA kernels for CI: nvcc on every source, no GPU and no CUDA torch needed.

The CPU torch wheel carries the ATen/c10 CUDA headers but no CUDA libraries, so the sources are
compiled (not linked) with the flags torch's JIT build uses (C++20, the ``__CUDA_NO_HALF*``
macros, ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE``), for sm_80 and sm_90, with every warning of our
own code an error (torch's headers come in as system headers). Then ``nm`` checks that each
launcher bindings.cpp calls is defined by the kernel objects with the same signature.

    python -m adapt_deploy.ops.compile_check [--arch 8.0;9.0] [--keep DIR]

Exits 0 after printing a note when nvcc is absent, 1 when a source does not compile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adapt_deploy.ops import cuda_build

CHECK_ARCHS = ("8.0", "9.0")
_NAMESPACE = "20adapt_deploy_kernels"  # how the Itanium ABI mangles `adapt_deploy_kernels::`


def find_nvcc() -> Path | None:
    """nvcc on PATH, else under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    return None


def check_sources() -> list[Path]:
    """Every .cu file and the binding (the same list the JIT build compiles)."""
    return cuda_build.sources()


def compile_command(
    nvcc: Path, source: Path, output: Path, archs: Sequence[str] = CHECK_ARCHS
) -> list[str]:
    """The nvcc command line for one source (JIT flags, warnings as errors, no linking)."""
    import torch
    from torch.utils import cpp_extension

    command = [str(nvcc), "-c", str(source), "-o", str(output), "-std=c++20"]
    for include in cpp_extension.include_paths():
        command += ["-isystem", include]
    command += [
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror",
        "-Werror=all-warnings",
    ]
    if source.suffix == ".cu":
        command += list(cpp_extension.COMMON_NVCC_FLAGS)
        command += cuda_build.nvcc_flags() + cuda_build.gencode_flags(archs)
    else:
        command += ["-O3"]
    return command


def missing_launchers(binding: Path, kernels: Sequence[Path]) -> list[str] | None:
    """Launchers the binding calls that no kernel object defines (mangled names); None: no nm."""
    nm = shutil.which("nm")
    if nm is None:
        return None

    def symbols(path: Path, flag: str) -> set[str]:
        out = subprocess.run([nm, flag, str(path)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}

    needed = {s for s in symbols(binding, "--undefined-only") if _NAMESPACE in s}
    defined: set[str] = set()
    for path in kernels:
        defined |= symbols(path, "--defined-only")
    return sorted(needed - defined)


def run_check(out_dir: Path, archs: Sequence[str] = CHECK_ARCHS, nvcc: Path | None = None) -> int:
    """Compile every source into out_dir, printing one line per file; 0 when all is well."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        print("compile check skipped: nvcc not found (put it on PATH or set CUDA_HOME)")
        return 0
    start = time.perf_counter()
    objects: dict[Path, Path] = {}
    for source in check_sources():
        output = out_dir / f"{source.name}.o"
        began = time.perf_counter()
        result = subprocess.run(
            compile_command(nvcc, source, output, archs), capture_output=True, text=True
        )
        seconds = time.perf_counter() - began
        if result.returncode != 0:
            print(f"FAILED {source.name} ({seconds:.1f} s):\n{result.stdout}{result.stderr}")
            return 1
        print(f"ok {source.name} ({seconds:.1f} s)")
        objects[source] = output
    bindings = [o for s, o in objects.items() if s.suffix == ".cpp"]
    kernels = [o for s, o in objects.items() if s.suffix == ".cu"]
    missing = missing_launchers(bindings[0], kernels) if bindings else []
    if missing is None:
        print("launcher symbols not checked: nm not found")
    elif missing:
        print("FAILED: bindings.cpp calls launchers no .cu file defines:")
        print("\n".join(f"  {symbol}" for symbol in missing))
        return 1
    total = time.perf_counter() - start
    print(f"compile check passed: {len(objects)} sources for {', '.join(archs)} in {total:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=";".join(CHECK_ARCHS), help="e.g. '8.0;9.0'")
    parser.add_argument("--keep", type=Path, help="write the objects here instead of a temp dir")
    args = parser.parse_args(argv)
    archs = cuda_build.parse_archs(args.arch)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run_check(args.keep, archs)
    with tempfile.TemporaryDirectory(prefix="adapt_deploy_kernels_") as tmp:
        return run_check(Path(tmp), archs)


if __name__ == "__main__":
    sys.exit(main())
