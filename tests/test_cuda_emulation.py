"""The CUDA kernels' own source, run on a CPU emulation of the CUDA execution model.

tests/cuda_emulation/ compiles adapt_deploy/cuda_kernels/*.cu with g++ against stub CUDA headers
(emu.h: one host thread per CUDA thread, real barriers, emulated warp shuffles and WMMA tiles) and
drives the host functions bindings.cpp calls. Outputs are compared with the float64 reference;
outputs and scratch start as NaN, so every element must be written. AddressSanitizer and
UndefinedBehaviorSanitizer catch out-of-bounds and misaligned accesses; a ThreadSanitizer build
catches shared-memory races (a missing __syncthreads). This covers the index math, tiling, launch
plans, splits and reductions; speed and GPU-only behaviour are bench/kernels.py's (on a GPU).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import Tensor

from adapt_deploy.ops.cuda_build import KERNELS_DIR
from adapt_deploy.ops.pooling import (
    _attention_pool_backward_reference,
    _lse_pool_backward_reference,
    attention_pool_reference,
    lse_pool_reference,
)

EMULATION = Path(__file__).parent / "cuda_emulation"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SMEM_OPTIN = 99 * 1024  # an sm_86-class GPU: the smallest opt-in shared memory of the targets
CASES = {
    # Cityscapes' 19 classes; channels and positions end mid-tile.
    "c19": dict(n=2, c=19, d=40, h=9, w=13, sms=1),
    # Forward split over positions, backward split over channels, three channel tiles.
    "splits": dict(n=1, c=5, d=260, h=33, w=17, sms=8),
    # Several class tiles; the backward's shared memory exceeds 48 KiB (opt-in attribute).
    "c70": dict(n=1, c=70, d=33, h=5, w=7, sms=2),
    "one position": dict(n=1, c=1, d=1, h=1, w=1, sms=1),
}


def _build(out: Path, sanitizers: str) -> Path:
    """Compile the kernels and the driver with g++ and the given -fsanitize list."""
    sources = [str(p) for p in sorted(KERNELS_DIR.glob("*.cu"))]
    command = [
        "g++", "-std=c++20", "-O0", "-g1", f"-fsanitize={sanitizers}", "-pthread",
        "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
        f"-I{EMULATION / 'include'}", "-x", "c++", *sources, "-x", "none",
        str(EMULATION / "driver.cpp"), "-o", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _probe(tmp: Path) -> str | None:
    """Why this g++ cannot build the emulation (C++20 <barrier>, _Float16, sanitizers), or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    probe = tmp / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { _Float16 h = 1; return int(h) - 1; }\n")
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsanitize=address,undefined", str(probe), "-o", str(tmp / "p")],
        capture_output=True,
        text=True,
    )
    return None if result.returncode == 0 else f"g++ cannot build the emulation: {result.stderr}"


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The emulation under AddressSanitizer and UndefinedBehaviorSanitizer."""
    tmp = tmp_path_factory.mktemp("emulation")
    reason = _probe(tmp)
    if reason:
        pytest.skip(reason)
    return _build(tmp / "driver_asan", "address,undefined")


def _save(t: Tensor, path: Path) -> None:
    t = t.contiguous()
    (t.view(torch.int16) if t.element_size() == 2 else t).numpy().tofile(path)


def _load(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    raw = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    data = torch.from_file(str(path), size=torch.Size(shape).numel(), dtype=raw)
    return data.view(dtype).reshape(shape)


def _run(
    driver: Path, op: str, dtype: torch.dtype, case: dict, work: Path, k: float = 1.0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Run one op on the emulation; {output: (emulated, float64 reference)}."""
    n, c, d, h, w = (case[key] for key in "ncdhw")
    gen = torch.Generator().manual_seed(n * 7919 + c * 104729 + d * 31 + h * w)
    logits = (3 * torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    features = torch.randn(n, d, h, w, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(n, c, d, generator=gen, dtype=torch.float64).to(dtype)
    grad_lse = grad[:, :, 0].contiguous()
    work.mkdir(parents=True, exist_ok=True)
    _save(logits, work / "logits.bin")
    _save(features, work / "features.bin")
    _save(grad if op.startswith("attention") else grad_lse, work / "grad.bin")
    args = [op, DTYPE_CODE[dtype], n, c, d, h, w, k, case["sms"], SMEM_OPTIN, work]
    result = subprocess.run(
        [str(driver), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    a, f = logits.double(), features.double()
    if op == "lse_forward":
        return {"out": (_load(work / "out.bin", dtype, (n, c)), lse_pool_reference(a, k))}
    if op == "lse_backward":
        ref = _lse_pool_backward_reference(grad_lse.double(), a, k)
        return {"grad_logits": (_load(work / "grad_logits.bin", dtype, (n, c, h, w)), ref)}
    if op == "attention_forward":
        return {"out": (_load(work / "out.bin", dtype, (n, c, d)), attention_pool_reference(a, f))}
    ref_a, ref_f = _attention_pool_backward_reference(grad.double(), a, f)
    if op == "attention_backward_features":
        return {"grad_features": (_load(work / "grad_features.bin", dtype, (n, d, h, w)), ref_f)}
    return {
        "grad_logits": (_load(work / "grad_logits.bin", dtype, (n, c, h, w)), ref_a),
        "grad_features": (_load(work / "grad_features.bin", dtype, (n, d, h, w)), ref_f),
    }


def _relative_error(got: Tensor, ref: Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return (got.double() - ref).abs().max().item() / scale


OPS = [("lse_forward", 2.5), ("lse_backward", 2.5), ("attention_forward", 1.0)]
OPS += [("attention_backward", 1.0), ("attention_backward_features", 1.0)]


# fp16 takes the bf16 code paths (tensor cores) but for the P scaling: not repeated on c70.
MATRIX = [(d, c) for d in DTYPE_CODE for c in CASES if (d, c) != (torch.float16, "c70")]


@pytest.mark.parametrize(("dtype", "case"), MATRIX, ids=[f"{str(d)[6:]}-{c}" for d, c in MATRIX])
def test_kernels_match_the_float64_reference(
    driver: Path, tmp_path: Path, dtype: torch.dtype, case: str
) -> None:
    for op, k in OPS:
        for name, (got, ref) in _run(driver, op, dtype, CASES[case], tmp_path / op, k).items():
            assert not torch.isnan(got).any(), f"{op}: {name} has elements never written"
            error = _relative_error(got, ref)
            assert error < TOLERANCE[dtype], f"{op}: {name} relative error {error:.2e}"


def test_no_shared_memory_races(driver: Path, tmp_path: Path) -> None:
    """ThreadSanitizer over the kernels with block-wide barriers (CUDA-core and tensor-core)."""
    tsan = _build(tmp_path / "driver_tsan", "thread")
    for dtype, op in [
        (torch.float32, "attention_forward"),  # CUDA-core tiles (and the shared pass over A)
        (torch.bfloat16, "attention_forward"),  # tensor-core tiles
        (torch.float32, "attention_backward"),  # dOut chunks, split partials, finalize
    ]:
        _run(tsan, op, dtype, CASES["splits"], tmp_path / f"{op}_{dtype}")  # exit 66 on a race
    # Features-only backward: P staged per class chunk (70 classes > 32), dOut steps.
    op = "attention_backward_features"
    _run(tsan, op, torch.float32, CASES["c70"], tmp_path / op)
