"""GPU verification of the fused pooling kernels: build, accuracy, opcheck, gradcheck, timings.
Writes bench/results/kernels.md and bench/results/kernel_choice.json. Needs a CUDA GPU (compute
capability 8.0+), nvcc and ninja.

    python -m bench.kernels [--batches 1 2 8] [--sizes 65x129 129x257] [--repeats 10]
                            [--no-compile]

1. Builds (or loads) the kernels with ADAPT_DEPLOY_KERNELS=require.
2. Accuracy on fresh random inputs against a float64 reference of the same (rounded) inputs:
   relative error max|out - ref| / max|ref| per output, fp32 < 1e-5, bf16 < 1e-2 (fp16 < 2e-3,
   fp64 < 1e-12); outputs are allocated over NaN-filled memory (freed blocks of the same sizes)
   so an element the kernels never write shows up.
3. torch.library.opcheck of the five ops, torch.autograd.gradcheck (fp64) and
   torch.compile(fullgraph=True) against eager, all on CUDA.
4. Median times (CUDA events; L2 flushed before every run) at C = 19, D = 2048, fp32 and bf16:
   a. each op's kernel against its PyTorch reference, with the bytes the op must move (the
      roofline in the .cu headers) as GB/s and % of a device-to-device copy measured in the same
      run. From these, kernel_choice.json: per op and dtype, whether the kernel was faster at
      every shape (the table ADAPT_DEPLOY_KERNELS=auto follows once copied into
      adapt_deploy/ops/kernel_choice.py);
   b. attention pooling forward, forward+backward into both inputs and forward+backward into
      the features alone (detached logits, the training case) through autograd, against the
      reference, torch.compile of it and the official per-sample loop.
   Goals: forward >= 70% of the copy at N=8; forward+backward (both kinds) >= 1.5x the
   reference; never slower than the reference at any shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adapt_deploy.errors import UserError
from bench.common import RESULTS, machine_info, write_results

CLASSES, DIM = 19, 2048
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(got: Tensor, ref: Tensor) -> float:
    """max|got - ref| / max|ref| (NaN anywhere in got gives inf)."""
    if torch.isnan(got).any():
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (got.double() - ref).abs().max().item() / scale


def poison(*like: Tensor) -> None:
    """Leave freed NaN-filled blocks of these sizes in the caching allocator for the outputs."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    torch.cuda.synchronize()
    del blocks


def random_inputs(n: int, c: int, d: int, h: int, w: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Fresh (unseeded) logits, features and output gradients on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    a = (3 * torch.randn(n, c, h, w, device="cuda", generator=gen)).to(dtype)
    f = torch.randn(n, d, h, w, device="cuda", generator=gen).to(dtype)
    g = torch.randn(n, c, d, device="cuda", generator=gen).to(dtype)
    return a, f, g


def check_accuracy(shapes: list[tuple[int, ...]]) -> list[str]:
    """One Markdown row per (dtype, shape): relative errors of every output vs float64."""
    from adapt_deploy.ops.pooling import (
        _attention_pool_backward_reference,
        _lse_pool_backward_reference,
        attention_pool_reference,
        lse_pool_reference,
    )

    ops = torch.ops.adapt_deploy
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n, c, d, h, w in shapes:
            a, f, g = random_inputs(n, c, d, h, w, dtype)
            gl = g[:, :, 0].contiguous()
            a64, f64, g64 = a.double(), f.double(), g.double()
            poison(torch.empty(n, c, d, device="cuda", dtype=dtype))
            out = ops.attention_pool(a, f)
            poison(a, f)
            da, df = ops.attention_pool_backward(g, a, f)
            poison(f)
            df_only = ops.attention_pool_backward_features(g, a, f)
            poison(torch.empty(n, c, device="cuda", dtype=dtype))
            lse = ops.lse_pool(a, 2.0)
            poison(a)
            dlse = ops.lse_pool_backward(gl, a, 2.0)
            ref_da, ref_df = _attention_pool_backward_reference(g64, a64, f64)
            errors = {
                "attention": relative_error(out, attention_pool_reference(a64, f64)),
                "dA": relative_error(da, ref_da),
                "dF": relative_error(df, ref_df),
                "dF only": relative_error(df_only, ref_df),
                "lse": relative_error(lse, lse_pool_reference(a64, 2.0)),
                "dlse": relative_error(dlse, _lse_pool_backward_reference(gl.double(), a64, 2.0)),
            }
            worst = max(errors.values())
            verdict = "pass" if worst < TOLERANCE[dtype] else "**FAIL**"
            cells = " | ".join(f"{e:.1e}" for e in errors.values())
            rows.append(f"| {str(dtype)[6:]} | {n}x{c}x{d}x{h}x{w} | {cells} | {verdict} |")
            print(rows[-1])
    return rows


def check_registrations() -> list[str]:
    """opcheck (fp32, bf16), gradcheck (fp64) and torch.compile against eager, on CUDA."""
    from adapt_deploy.ops import attention_pool, lse_pool

    ops = torch.ops.adapt_deploy
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        a, f, g = random_inputs(2, 5, 33, 7, 9, dtype)
        torch.library.opcheck(ops.lse_pool, (a.clone().requires_grad_(), 1.5))
        torch.library.opcheck(ops.lse_pool_backward, (g[:, :, 0].contiguous(), a, 1.5))
        torch.library.opcheck(
            ops.attention_pool, (a.clone().requires_grad_(), f.clone().requires_grad_())
        )
        torch.library.opcheck(ops.attention_pool_backward, (g, a, f))
        torch.library.opcheck(ops.attention_pool_backward_features, (g, a, f))
        lines.append(f"- opcheck ({str(dtype)[6:]}): all five ops pass")
    a, f, _ = random_inputs(2, 3, 5, 4, 6, torch.float64)
    a.requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lse_pool(x, 2.5), (a,))
    assert torch.autograd.gradcheck(attention_pool, (a, f))
    assert torch.autograd.gradcheck(lambda y: attention_pool(a.detach(), y), (f,))
    lines.append(
        "- gradcheck (fp64, CUDA): lse_pool, attention_pool (both inputs; features only) pass"
    )

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return lse_pool(x, 1.5).square().sum() + attention_pool(x, y).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    a, f, _ = random_inputs(2, 19, 64, 17, 33, torch.float32)
    results = []
    for fn in (compiled, loss):
        x, y = a.clone().requires_grad_(), f.clone().requires_grad_()
        value = fn(x, y)
        value.backward()
        results.append((value.detach(), x.grad, y.grad))
    torch.testing.assert_close(results[0], results[1])
    lines.append("- torch.compile (inductor, fullgraph) forward and backward equal eager")
    return lines


# --- timing -------------------------------------------------------------------------------


def cuda_median(fn: Callable[[], object], repeats: int, flush: Tensor) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up, L2 flushed before each."""
    fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return statistics.median(times)


def copy_bandwidth(repeats: int, flush: Tensor) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_median(lambda: dst.copy_(src), repeats, flush)
    return 2 * src.numel() / seconds


@dataclass
class Timing:
    forward: float
    forward_backward: float  # gradients of both inputs
    forward_backward_features: float  # detached logits: the features' gradient alone


def time_variant(
    pool: Callable[[Tensor, Tensor], Tensor], a: Tensor, f: Tensor, repeats: int, flush: Tensor
) -> Timing:
    """Forward alone, forward + backward into both inputs, and into the features alone."""
    ad, fd = a.detach().requires_grad_(), f.detach().requires_grad_()
    grad = torch.randn(a.shape[0], a.shape[1], f.shape[1], device="cuda", dtype=a.dtype)

    def forward() -> None:
        with torch.no_grad():
            pool(a, f)

    def forward_backward() -> None:
        torch.autograd.grad(pool(ad, fd), (ad, fd), grad)

    def forward_backward_features() -> None:
        torch.autograd.grad(pool(a.detach(), fd), (fd,), grad)

    return Timing(
        cuda_median(forward, repeats, flush),
        cuda_median(forward_backward, repeats, flush),
        cuda_median(forward_backward_features, repeats, flush),
    )


@dataclass(frozen=True)
class OpCase:
    """One op's kernel call, its reference call, and the bytes the op must move (roofline)."""

    op: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes_moved: int


def op_cases(a: Tensor, f: Tensor, g: Tensor) -> list[OpCase]:
    """The five ops on these inputs. Bytes: every input read once and every output written
    once, except where the op needs no read of F (the features-only backward)."""
    from adapt_deploy.ops.pooling import (
        _attention_pool_backward_reference,
        _grad_features_only,
        _lse_pool_backward_reference,
        attention_pool_reference,
        lse_pool_reference,
    )

    ops = torch.ops.adapt_deploy_kernels
    es = a.element_size()
    size_a, size_f, size_g = a.numel() * es, f.numel() * es, g.numel() * es
    gl = g[:, :, 0].contiguous()
    return [
        OpCase("lse_pool", lambda: ops.lse_pool(a, 1.0), lambda: lse_pool_reference(a), size_a),
        OpCase(
            "lse_pool_backward",
            lambda: ops.lse_pool_backward(gl, a, 1.0),
            lambda: _lse_pool_backward_reference(gl, a, 1.0),
            2 * size_a,
        ),
        OpCase(
            "attention_pool",
            lambda: ops.attention_pool(a, f),
            lambda: attention_pool_reference(a, f),
            size_a + size_f + size_g,
        ),
        OpCase(
            "attention_pool_backward",
            lambda: ops.attention_pool_backward(g, a, f),
            lambda: _attention_pool_backward_reference(g, a, f),
            size_g + 2 * size_a + 2 * size_f,
        ),
        OpCase(
            "attention_pool_backward_features",
            lambda: ops.attention_pool_backward_features(g, a, f),
            lambda: _grad_features_only(g, a, f),
            size_g + size_a + size_f,
        ),
    ]


@dataclass
class OpTiming:
    op: str
    dtype: str
    n: int
    size: str
    kernel_ms: float
    reference_ms: float
    kernel_share_of_copy: float  # bytes the op must move per second, over the copy's


def run_op_timings(
    dtypes: list[torch.dtype],
    batches: list[int],
    sizes: list[tuple[int, int]],
    repeats: int,
    flush: Tensor,
    copy: float,
) -> tuple[list[str], list[OpTiming]]:
    """Each op's kernel against its reference: Markdown rows and the raw timings."""
    rows = [
        "| op | dtype | N | H'xW' | kernel (ms) | reference (ms) | kernel vs ref "
        "| kernel GB/s (% of copy) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    timings = []
    for dtype in dtypes:
        for h, w in sizes:
            for n in batches:
                a, f, g = random_inputs(n, CLASSES, DIM, h, w, dtype)
                with torch.no_grad():
                    for case in op_cases(a, f, g):
                        kernel = cuda_median(case.kernel, repeats, flush)
                        reference = cuda_median(case.reference, repeats, flush)
                        share = case.bytes_moved / kernel / copy
                        timings.append(
                            OpTiming(
                                case.op, str(dtype)[6:], n, f"{h}x{w}",
                                1e3 * kernel, 1e3 * reference, share,
                            )
                        )  # fmt: skip
                        rows.append(
                            f"| {case.op} | {str(dtype)[6:]} | {n} | {h}x{w} | {1e3 * kernel:.3f} "
                            f"| {1e3 * reference:.3f} | {reference / kernel:.2f}x "
                            f"| {case.bytes_moved / kernel / 1e9:.0f} ({100 * share:.0f}%) |"
                        )
                        print(rows[-1])
                del a, f, g
                torch.cuda.empty_cache()
    return rows, timings


def kernel_choice(timings: list[OpTiming]) -> dict[str, list[str]]:
    """Per op, the dtypes whose kernel was faster than the reference at every timed shape."""
    faster: dict[str, list[str]] = {}
    for op in dict.fromkeys(t.op for t in timings):
        for dtype in dict.fromkeys(t.dtype for t in timings if t.op == op):
            runs = [t for t in timings if t.op == op and t.dtype == dtype]
            if all(t.kernel_ms < t.reference_ms for t in runs):
                faster.setdefault(op, []).append(dtype)
    return faster


def write_kernel_choice(timings: list[OpTiming], argv: list[str]) -> Path:
    """bench/results/kernel_choice.json: the measured winners and what they were measured on."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    record = {
        "rule": "ADAPT_DEPLOY_KERNELS=auto runs an op's kernel for a dtype only where it was "
        "faster than the reference at every timed shape; copy `faster` into "
        "adapt_deploy/ops/kernel_choice.py (FASTER, MEASURED_ON) to adopt it",
        "measured_on": {**machine_info(), "commit": commit, "command": " ".join(argv)},
        "faster": kernel_choice(timings),
        "timings": [vars(t) for t in timings],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "kernel_choice.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def run_timings(
    batches: list[int],
    sizes: list[tuple[int, int]],
    repeats: int,
    flush: Tensor,
    copy: float,
    with_compile: bool,
) -> list[str]:
    """Markdown rows: attention pooling through autograd against the reference, torch.compile
    of it and the official loop; speed-ups and the forward's share of the copy bandwidth."""
    from adapt_deploy.ops import attention_pool, attention_pool_reference
    from bench.components import official_pool

    def official(a: Tensor, f: Tensor) -> Tensor:
        return official_pool(a, f).transpose(1, 2)  # (N, C, D) like the others

    variants: list[tuple[str, Callable[[Tensor, Tensor], Tensor]]] = [
        ("fused", attention_pool),
        ("reference", attention_pool_reference),
        ("official", official),
    ]
    if with_compile:
        # One specialized graph per shape and grad mode, not eager after the default limit.
        torch._dynamo.config.recompile_limit = 256
        variants.insert(2, ("compile", torch.compile(attention_pool_reference, dynamic=False)))
    names = [name for name, _ in variants]
    phases = ("forward", "forward_backward", "forward_backward_features")
    header = [f"{v} {label}" for label in ("fwd", "fwd+bwd", "fwd+bwd(F)") for v in names]
    rows = [
        f"| dtype | N | H'xW' | {' | '.join(header)} | fwd+bwd vs ref | fwd+bwd(F) vs ref "
        "| fused fwd GB/s (% of copy) |",
        "|" + "---|" * (len(header) + 6),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for h, w in sizes:
            for n in batches:
                a, f, _ = random_inputs(n, CLASSES, DIM, h, w, dtype)
                timings = {name: time_variant(fn, a, f, repeats, flush) for name, fn in variants}
                moved = (a.numel() + f.numel() + n * CLASSES * DIM) * a.element_size()
                gbs = moved / timings["fused"].forward
                ref, fused = timings["reference"], timings["fused"]
                both = ref.forward_backward / fused.forward_backward
                features = ref.forward_backward_features / fused.forward_backward_features
                ms = [f"{1e3 * getattr(timings[v], ph):.3f}" for ph in phases for v in names]
                rows.append(
                    f"| {str(dtype)[6:]} | {n} | {h}x{w} | {' | '.join(ms)} | {both:.2f}x "
                    f"| {features:.2f}x | {gbs / 1e9:.0f} ({100 * gbs / copy:.0f}%) |"
                )
                print(rows[-1])
                del a, f
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--sizes", nargs="+", default=["65x129", "129x257"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile of the reference (faster)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (python -m bench.kernels)")

    os.environ["ADAPT_DEPLOY_KERNELS"] = "require"
    from adapt_deploy.ops import kernels

    kernels.reset()
    try:
        status = kernels.kernel_status()  # builds (JIT) or loads them
    except UserError as exc:
        raise SystemExit(f"the kernels are not usable here: {exc}") from None
    print(status.describe())
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    shapes = [(1, 1, 1, 1, 1), (2, 19, 40, 9, 13), (1, 70, 130, 33, 17), (2, 19, DIM, 65, 129)]
    accuracy = check_accuracy(shapes)
    registrations = check_registrations()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    copy = copy_bandwidth(args.repeats, flush)
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s")
    op_rows, op_timings = run_op_timings(
        [torch.float32, torch.bfloat16], args.batches, sizes, args.repeats, flush, copy
    )
    choice = write_kernel_choice(op_timings, ["python", "-m", "bench.kernels", *sys.argv[1:]])
    winners = json.loads(choice.read_text())["faster"]
    timings = run_timings(args.batches, sizes, args.repeats, flush, copy, not args.no_compile)

    body = [
        f"Kernels: {status.describe()}.",
        "",
        "## Accuracy (relative error max|out - ref| / max|ref| against float64; "
        "fresh random inputs; outputs allocated over NaN)",
        "",
        "| dtype | NxCxDxHxW | attention | dA | dF | dF only | lse (k=2) | dlse | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        *accuracy,
        "",
        "Tolerances: fp32 1e-5, bf16 1e-2, fp16 2e-3, fp64 1e-12.",
        "",
        "## Registrations",
        "",
        *registrations,
        "",
        f"## Speed (C={CLASSES}, D={DIM}; median of {args.repeats} runs, L2 flushed)",
        "",
        f"Device-to-device copy: {copy / 1e9:.0f} GB/s (read + write, 1 GiB).",
        "",
        "### Each op: kernel against its reference",
        "",
        "GB/s counts the bytes the op must move (each input it needs read once, each output "
        "written once; the roofline in the .cu headers).",
        "",
        *op_rows,
        "",
        f"Faster than the reference at every shape (written to {choice.name}; "
        f"ADAPT_DEPLOY_KERNELS=auto follows adapt_deploy/ops/kernel_choice.py): "
        + (", ".join(f"{op} ({', '.join(d)})" for op, d in winners.items()) or "none"),
        "",
        "### Attention pooling through autograd",
        "",
        "fwd+bwd: gradients of both inputs; fwd+bwd(F): detached logits, the features' gradient "
        "alone (the training case). Reference: the PyTorch definition "
        "(`attention_pool_reference`, fp32 math for bf16 inputs); compile: torch.compile of it "
        "(inductor); official: weak-da-seg's per-sample `torch.mm` loop. GB/s counts the bytes "
        "the forward must move (read A and F, write the output). Goals: forward >= 70% of copy "
        "at N=8; both fwd+bwd >= 1.5x the reference; never slower than the reference.",
        "",
        *timings,
    ]
    path = write_results("kernels", "Fused pooling kernels on the GPU", "\n".join(body))
    print(path.read_text())


if __name__ == "__main__":
    main()
