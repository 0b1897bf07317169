"""GPU verification of the fused pooling kernels: build, accuracy, opcheck, gradcheck, timings.
Writes bench/results/kernels.md. Needs a CUDA GPU (compute capability 8.0+), nvcc and ninja.

    python -m bench.kernels [--batches 1 2 8] [--sizes 33x65 65x129 129x257] [--repeats 10]

1. Builds (or loads) the kernels with ADAPT_DEPLOY_KERNELS=require.
2. Accuracy on fresh random inputs against a float64 reference of the same (rounded) inputs:
   relative error max|out - ref| / max|ref| per output, fp32 < 1e-5, bf16 < 1e-2 (fp16 < 2e-3,
   fp64 < 1e-12); outputs are allocated over NaN-filled memory (freed blocks of the same sizes)
   so an element the kernels never write shows up.
3. torch.library.opcheck of the four ops, torch.autograd.gradcheck (fp64) and
   torch.compile(fullgraph=True) against eager, all on CUDA.
4. Median times (CUDA events; L2 flushed before every run) of forward and forward+backward
   against (a) the PyTorch reference, (b) torch.compile of it, (c) the official per-sample loop,
   at C = 19, D = 2048, fp32 and bf16, and the achieved GB/s against a device-to-device copy
   measured in the same run. Goals: forward+backward >= 1.5x the reference at 65x129; forward
   >= 70% of copy bandwidth at N = 8.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adapt_deploy.errors import UserError
from bench.common import write_results

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
            poison(torch.empty(n, c, device="cuda", dtype=dtype))
            lse = ops.lse_pool(a, 2.0)
            poison(a)
            dlse = ops.lse_pool_backward(gl, a, 2.0)
            ref_da, ref_df = _attention_pool_backward_reference(g64, a64, f64)
            errors = {
                "attention": relative_error(out, attention_pool_reference(a64, f64)),
                "dA": relative_error(da, ref_da),
                "dF": relative_error(df, ref_df),
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
        lines.append(f"- opcheck ({str(dtype)[6:]}): all four ops pass")
    a, f, _ = random_inputs(2, 3, 5, 4, 6, torch.float64)
    a.requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lse_pool(x, 2.5), (a,))
    assert torch.autograd.gradcheck(attention_pool, (a, f))
    lines.append("- gradcheck (fp64, CUDA): lse_pool and attention_pool (both inputs) pass")

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
    forward_backward: float


def time_variant(
    pool: Callable[[Tensor, Tensor], Tensor], a: Tensor, f: Tensor, repeats: int, flush: Tensor
) -> Timing:
    """Forward alone, then forward + backward into both inputs."""
    ad, fd = a.detach().requires_grad_(), f.detach().requires_grad_()
    grad = torch.randn(a.shape[0], a.shape[1], f.shape[1], device="cuda", dtype=a.dtype)

    def forward() -> None:
        with torch.no_grad():
            pool(a, f)

    def forward_backward() -> None:
        torch.autograd.grad(pool(ad, fd), (ad, fd), grad)

    return Timing(
        cuda_median(forward, repeats, flush), cuda_median(forward_backward, repeats, flush)
    )


def run_timings(batches: list[int], sizes: list[tuple[int, int]], repeats: int) -> list[str]:
    """Markdown rows: times, speed-ups and achieved bandwidth per shape and dtype."""
    from adapt_deploy.ops import attention_pool, attention_pool_reference
    from bench.components import official_pool

    def official(a: Tensor, f: Tensor) -> Tensor:
        return official_pool(a, f).transpose(1, 2)  # (N, C, D) like the others

    # One specialized graph per shape and grad mode (36 here), not eager after the default limit.
    torch._dynamo.config.recompile_limit = 256
    compiled = torch.compile(attention_pool_reference, dynamic=False)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    copy = copy_bandwidth(repeats, flush)
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s")
    rows = [f"Device-to-device copy: {copy / 1e9:.0f} GB/s (read + write, 1 GiB).", ""]
    rows += [
        "| dtype | N | H'xW' | fused fwd (ms) | ref fwd | compile fwd | official fwd "
        "| fused fwd+bwd (ms) | ref fwd+bwd | compile fwd+bwd | official fwd+bwd "
        "| fwd+bwd vs ref | fused fwd GB/s (% of copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for h, w in sizes:
            for n in batches:
                a, f, _ = random_inputs(n, CLASSES, DIM, h, w, dtype)
                timings = {
                    name: time_variant(fn, a, f, repeats, flush)
                    for name, fn in (
                        ("fused", attention_pool),
                        ("reference", attention_pool_reference),
                        ("compile", compiled),
                        ("official", official),
                    )
                }
                moved = (a.numel() + f.numel() + n * CLASSES * DIM) * a.element_size()
                gbs = moved / timings["fused"].forward
                speedup = timings["reference"].forward_backward / timings["fused"].forward_backward
                ms = [
                    f"{1e3 * getattr(timings[v], phase):.3f}"
                    for phase in ("forward", "forward_backward")
                    for v in ("fused", "reference", "compile", "official")
                ]
                rows.append(
                    f"| {str(dtype)[6:]} | {n} | {h}x{w} | {' | '.join(ms)} | {speedup:.2f}x "
                    f"| {gbs / 1e9:.0f} ({100 * gbs / copy:.0f}%) |"
                )
                print(rows[-1])
                del a, f
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--sizes", nargs="+", default=["33x65", "65x129", "129x257"])
    parser.add_argument("--repeats", type=int, default=10)
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
    timings = run_timings(args.batches, sizes, args.repeats)

    body = [
        f"Kernels: {status.describe()}.",
        "",
        "## Accuracy (relative error max|out - ref| / max|ref| against float64; "
        "fresh random inputs; outputs allocated over NaN)",
        "",
        "| dtype | NxCxDxHxW | attention | dA | dF | lse (k=2) | dlse | verdict |",
        "|---|---|---|---|---|---|---|---|",
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
        "Forward+backward computes the gradients of both inputs. Reference: the PyTorch "
        "definition (`attention_pool_reference`, fp32 math for bf16 inputs); compile: "
        "torch.compile of it (inductor); official: weak-da-seg's per-sample `torch.mm` loop. "
        "GB/s counts the bytes the forward must move (read A and F, write the output). Goals: "
        "forward+backward >= 1.5x the reference at 65x129; forward >= 70% of copy at N=8.",
        "",
        *timings,
    ]
    path = write_results("kernels", "Fused pooling kernels on the GPU", "\n".join(body))
    print(path.read_text())


if __name__ == "__main__":
    main()
