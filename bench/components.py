"""Category-wise block benchmark: attention pooling + 19 category discriminators + Eq. 4/5
losses, forward and backward, batched vs the official formulation. Writes
bench/results/components.md.

    python -m bench.components [--runs 10] [--repeats 9] [--batches 1 2] [--keep-freed-memory]

One step is what a WDA training iteration does with this block (weak-da-seg's trainer_weakda):
the generator step (discriminators frozen, Eq. 5 back into the target features) and the
discriminator step (Eq. 4 on detached source and target features, source / target halves).
The official formulation pools with a per-sample ``torch.mm`` loop and runs a Python loop over 19
``nn.Sequential`` MLPs; its losses loop over images as ``get_adv_loss`` does. Both run on the
same weights and inputs, are checked against each other, then timed side by side.

--keep-freed-memory (Linux, glibc) makes malloc keep freed blocks in its heap instead of
returning them to the system (mallopt: no mmap, no trim) before anything is allocated, for both
variants alike: large gradients are then reused instead of faulted in again each step. Its
results go to bench/results/components_heap.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from adapt_deploy.adapt.losses import category_adversarial_loss, category_discriminator_loss
from adapt_deploy.models.discriminators import CategoryDiscriminators
from adapt_deploy.ops import attention_pool
from bench.common import write_results

NUM_CLASSES, DIM, HEIGHT, WIDTH = 19, 2048, 65, 129


@dataclass
class Inputs:
    """One iteration's tensors: logits and features of both domains and their class labels."""

    logits_s: torch.Tensor
    logits_t: torch.Tensor
    feats_s: torch.Tensor
    feats_t: torch.Tensor  # a leaf that requires grad: the generator's path
    y_s: torch.Tensor
    y_t: torch.Tensor


def make_inputs(batch: int, seed: int = 0) -> Inputs:
    """Random inputs at the paper's shapes; a few classes present per image, as in Cityscapes."""
    g = torch.Generator().manual_seed(seed)
    shape_a, shape_f = (batch, NUM_CLASSES, HEIGHT, WIDTH), (batch, DIM, HEIGHT, WIDTH)
    return Inputs(
        logits_s=torch.randn(shape_a, generator=g) * 3,
        logits_t=torch.randn(shape_a, generator=g) * 3,
        feats_s=torch.relu(torch.randn(shape_f, generator=g)),
        feats_t=torch.relu(torch.randn(shape_f, generator=g)).requires_grad_(True),
        y_s=(torch.rand(batch, NUM_CLASSES, generator=g) < 0.5).float(),
        y_t=(torch.rand(batch, NUM_CLASSES, generator=g) < 0.5).float(),
    )


# --- the official formulation (weak-da-seg), restated for timing --------------------------------


def official_pool(logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """weak-da-seg ``get_pooled_feat``: softmax over HW, then one torch.mm per sample; (B, F, C)."""
    b, c = logits.shape[:2]
    pred = logits.view(b, c, -1).permute(0, 2, 1)
    feat = feats.view(b, feats.shape[1], -1).permute(0, 2, 1)
    attention = F.softmax(pred, dim=1)
    return torch.stack([torch.mm(feat[i].t(), attention[i]) for i in range(b)])


def official_discriminators(models: nn.ModuleList, pooled: torch.Tensor) -> torch.Tensor:
    """weak-da-seg ``CWDiscriminator.forward``: a Python loop over the classes; (B, C)."""
    outputs = [models[i](pooled[:, :, i]) for i in range(len(models))]
    return torch.stack(outputs).squeeze(-1).permute(1, 0)


def official_adv_loss(preds: torch.Tensor, weak: torch.Tensor, label: float) -> torch.Tensor:
    """weak-da-seg ``get_adv_loss`` (BCE): per image the mean over present classes, then mean."""
    losses = []
    for i in range(len(preds)):
        present = (weak[i] > 0).nonzero().reshape(-1)
        if len(present) > 0:
            p = preds[i].index_select(0, present)
            t = torch.full_like(p, label)
            bce = [F.binary_cross_entropy_with_logits(a, b) for a, b in zip(p, t, strict=True)]
            losses.append(torch.stack(bce).mean())
    return torch.stack(losses).mean()


def _requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def official_step(models: nn.ModuleList, x: Inputs) -> None:
    """Generator then discriminator step of the category-wise block, as trainer_weakda does it."""
    _requires_grad(models.parameters(), False)
    pooled_s = official_pool(x.logits_s, x.feats_s)
    pooled_t = official_pool(x.logits_t, x.feats_t)
    official_adv_loss(official_discriminators(models, pooled_t), x.y_t, 0.0).backward()
    _requires_grad(models.parameters(), True)
    source = official_adv_loss(official_discriminators(models, pooled_s.detach()), x.y_s, 0.0)
    (source / 2).backward()
    target = official_adv_loss(official_discriminators(models, pooled_t.detach()), x.y_t, 1.0)
    (target / 2).backward()


# --- the batched implementation ----------------------------------------------------------------


def batched_step(disc: CategoryDiscriminators, x: Inputs) -> None:
    """The same step: one attention_pool per domain, one discriminator call per step."""
    _requires_grad(disc.parameters(), False)
    pooled_s = attention_pool(x.logits_s, x.feats_s)
    pooled_t = attention_pool(x.logits_t, x.feats_t)
    category_adversarial_loss(disc(pooled_t), x.y_t).backward()
    _requires_grad(disc.parameters(), True)
    out = disc(torch.cat([pooled_s, pooled_t.detach()]))
    n = x.y_s.shape[0]
    category_discriminator_loss(out[:n], out[n:], x.y_s, x.y_t).backward()


# --- measurement -------------------------------------------------------------------------------


def _clear(module: nn.Module, x: Inputs) -> None:
    module.zero_grad(set_to_none=True)
    x.feats_t.grad = None


def check_equal(disc: CategoryDiscriminators, models: nn.ModuleList, x: Inputs) -> float:
    """Run both once and return the largest gradient difference relative to its tensor's scale."""
    _clear(disc, x)
    batched_step(disc, x)
    grads_batched = [x.feats_t.grad.clone()] + [p.grad.clone() for p in disc.parameters()]
    _clear(models, x)
    official_step(models, x)
    linears = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in models]
    grads_official = [x.feats_t.grad.clone()]
    for k in range(3):
        grads_official.append(torch.stack([ls[k].weight.grad.t() for ls in linears]))
        grads_official.append(torch.stack([ls[k].bias.grad for ls in linears]))
    worst = 0.0
    for a, b in zip(grads_batched, grads_official, strict=True):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    _clear(disc, x)
    _clear(models, x)
    return worst


def timed(step: Callable[[], None], clear: Callable[[], None]) -> float:
    """Wall time of one ``step``, gradients cleared before (and not timed)."""
    clear()
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    clear()
    return elapsed


def hidden_layer_bytes() -> int:
    """Least memory traffic of one step over the two 2048x2048 hidden layers of all classes.

    Generator step: forward and the input gradient each read both layers. Discriminator step:
    forward reads both, the backward reads the second (for the first layer's input gradient) and
    writes both weight gradients. 7 layer reads + 2 layer writes, whatever the batch.
    """
    layer = NUM_CLASSES * DIM * DIM * 4
    return 9 * layer


def copy_bandwidth(repeats: int = 9) -> float:
    """Bytes per second (read + write) of a large tensor copy, fastest of ``repeats``: the roof."""
    src = torch.ones(NUM_CLASSES, DIM, DIM)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never trim it (see the module doc)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30)):
        raise SystemExit("mallopt refused the settings (not glibc?)")


def measure(
    disc: CategoryDiscriminators, models: nn.ModuleList, x: Inputs, repeats: int
) -> tuple[float, float]:
    """(official, batched) seconds per step: medians of `repeats` interleaved runs."""
    run_official = (partial(official_step, models, x), partial(_clear, models, x))
    run_batched = (partial(batched_step, disc, x), partial(_clear, disc, x))
    timed(*run_official), timed(*run_batched)  # warm-up
    # Interleaved so that load from other processes hits both alike.
    official, batched = [], []
    for _ in range(repeats):
        official.append(timed(*run_official))
        batched.append(timed(*run_batched))
    return statistics.median(official), statistics.median(batched)


def _median_ms(step: Callable[[], object], repeats: int = 7) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def thin_row_forms(max_rows: int = 4) -> list[str]:
    """Markdown: the backward's matmul forms at 1..max_rows rows per class, a hidden layer's
    shapes; what models/batched_linear.py chooses between (and what a fresh output costs)."""
    weight = torch.randn(NUM_CLASSES, DIM, DIM)
    kept = torch.empty_like(weight)
    kept.fill_(0.0)  # touched once, as the kept gradient memory is after the first step
    lines = [
        "| rows per class | weight grad: mul + addcmul, kept memory (ms) | bmm, kept memory "
        "(ms) | bmm, fresh tensor (ms) | input grad: (W·gᵀ)ᵀ (ms) | bmm(g, Wᵀ) (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for rows in range(1, max_rows + 1):
        x, g = torch.randn(NUM_CLASSES, rows, DIM), torch.randn(NUM_CLASSES, rows, DIM)

        def elementwise(x: torch.Tensor = x, g: torch.Tensor = g) -> None:
            torch.mul(x[:, 0, :, None], g[:, 0, None, :], out=kept)
            for m in range(1, x.shape[1]):
                kept.addcmul_(x[:, m, :, None], g[:, m, None, :])

        cells = [
            _median_ms(elementwise),
            _median_ms(lambda x=x, g=g: torch.bmm(x.transpose(1, 2), g, out=kept)),
            _median_ms(lambda x=x, g=g: torch.bmm(x.transpose(1, 2), g)),
            _median_ms(lambda g=g: torch.bmm(weight, g.transpose(1, 2)).transpose(1, 2)),
            _median_ms(lambda g=g: torch.bmm(g, weight.transpose(1, 2))),
        ]
        lines.append(f"| {rows} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per variant and run")
    parser.add_argument(
        "--runs", type=int, default=1, help="whole measurements per batch (ratio: their median)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed blocks (both variants)"
    )
    args = parser.parse_args()
    if min(args.repeats, args.runs, *args.batches) < 1:
        parser.error("--repeats, --runs and --batches must be at least 1")
    if args.keep_freed_memory:
        keep_freed_memory()

    torch.manual_seed(0)
    disc = CategoryDiscriminators(NUM_CLASSES, in_dim=DIM, hidden=DIM)
    models = disc.to_sequentials()
    rows = []
    for batch in args.batches:
        x = make_inputs(batch)
        error = check_equal(disc, models, x)
        if error > 1e-4:
            raise SystemExit(f"batch {batch}: gradients differ by {error:.2e} (relative)")
        runs = [measure(disc, models, x, args.repeats) for _ in range(args.runs)]
        ratios = [o / b for o, b in runs]
        t_official = statistics.median(o for o, _ in runs)
        t_batched = statistics.median(b for _, b in runs)
        rows.append((batch, t_official, t_batched, ratios, error))
        print(
            f"batch {batch}: official {t_official:.3f} s, batched {t_batched:.3f} s, "
            f"speed-up per run {', '.join(f'{r:.2f}' for r in ratios)}"
        )

    bandwidth = copy_bandwidth()
    floor = hidden_layer_bytes() / bandwidth
    lines = [
        f"C={NUM_CLASSES} discriminators {DIM}→{DIM}→{DIM}→1, features and logits at "
        f"{HEIGHT}x{WIDTH}, CPU, fp32; one step = generator step (Eq. 5 into the target "
        "features) + discriminator step (Eq. 4 into the discriminators), forward and backward. "
        f"{args.runs} run(s) per batch; each: one warm-up, then the median of {args.repeats} "
        "steps, the two variants interleaved. Times: median over runs; speed-up: median of the "
        "runs' ratios.",
        "",
        "| batch | official loop (s) | batched (s) | speed-up | speed-up, each run | "
        "memory floor (s) | official / floor | max rel. grad diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {b} | {o:.3f} | {t:.3f} | {statistics.median(r):.2f}x | "
        f"{', '.join(f'{v:.2f}' for v in r)} | {floor:.3f} | {o / floor:.1f}x | {e:.1e} |"
        for b, o, t, r, e in rows
    ]
    lines += [
        "",
        "Official: weak-da-seg's per-sample `torch.mm` pooling, a Python loop over 19 "
        "`nn.Sequential` MLPs called three times (generator, source, target) and its per-image "
        "loss loop. Batched: `adapt_deploy.ops.attention_pool`, `CategoryDiscriminators` "
        "(one batched matmul per layer, source and target in one call: "
        "`adapt_deploy.models.batched_linear`; the weight gradients and the feature gradient "
        "written into memory reused between steps once nobody holds it: "
        "`adapt_deploy.gradient_memory.reusable_gradient`) and `adapt_deploy.adapt.losses`. "
        "Gradients are cleared with `zero_grad(set_to_none=True)` between steps, as the trainer "
        "does. Target: batched at least 3x faster.",
        "",
        f"Memory floor: the step must stream the hidden layers' weights at least 7 times and "
        f"write their gradients once ({hidden_layer_bytes() / 1e9:.2f} GB, whatever the batch); "
        f"at this machine's copy bandwidth, measured in the same run "
        f"({bandwidth / 1e9:.1f} GB/s read + write), that takes {floor:.3f} s. No implementation "
        "of the same step can beat the official loop by more than official / floor.",
    ]
    lines += [
        "",
        "The backward's matmul forms at a hidden layer's shapes (median of 7 calls; "
        "`models/batched_linear.py` uses the first and fourth columns up to 3 rows per class; "
        "a fresh tensor pays first-touch page faults, kept memory does not):",
        "",
        *thin_row_forms(),
    ]
    if args.keep_freed_memory:
        lines += ["", "Run with --keep-freed-memory: glibc kept freed blocks in its heap."]
    name = "components_heap" if args.keep_freed_memory else "components"
    path = write_results(name, "Category-wise block: batched vs official", "\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
