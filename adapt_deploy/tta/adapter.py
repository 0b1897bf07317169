"""OnlineAdapter: a PyTorch copy of the deployed model that learns from the frames it is shown.

One update (`step(frame)`), as a mean teacher (CoTTA) driven by weak labels (Eq. 2, 7):

1. The student segments the frame. Its BN statistics are mixed source/test (see `bn`), and
   this frame enters its condition's test average here (a detected shift without a bank
   restarts the average). Only the early layers adapt, where weather changes an image's
   statistics: the BN layers of the backbone's last `source_stages` stages keep the source's
   (on bench/tta's drive: 17.6 mIoU keeping the last two stages' statistics, 15.2 adapting
   every layer). In the early layers the source's share λ is the condition's: 1 at the home
   radius, fading to `bn_prior` `prior_fade` home radii further out, so a condition near the
   training data keeps most of the statistics the model was trained with (bench/results/
   tta.md, tta_ablation.md).
2. The teacher (an EMA of the student's weights with the student's mixed statistics: what the
   runtime runs) segments the same frame, a pure inference forward run as the torch backend
   runs one (`teacher_precision` fp32 / fp16 / bf16 autocast; on CUDA replayed from a CUDA
   graph, which reads the live weights: the EMA update, statistics copy, resets and rollbacks
   all write them in place); its class presence gives pseudo-weak labels
   y_c = [p_c > T_c]. T_c is calibrated per class on the source at export (`SourceStats`):
   the uncalibrated presence is above the paper's global T = 0.2 for every class in every
   image. The cut is applied to the LSE value itself (`lse_thresholds`), where it can be
   resolved; the sigmoid is exactly 1.0 in float32 for confident classes.
3. The student is trained on the weak-label loss of its presence against y, shifted so that
   T_c sits at 0.5, and on the teacher's labels of its confident pixels as pixel
   pseudo-labels (cross-entropy); optionally the entropy of its predictions on those pixels;
   optionally the cosine distance of its attention-pooled class features (Eq. 3) to the
   source prototypes of the present classes, a stand-in for the category discriminators,
   which need source images.
4. Stochastic restore, the EMA teacher update and the collapse check (see `safety`).

Only the chosen parameters train (BN affine by default), so an update is cheap. On a GPU that
computes in bf16 the student's forward and backward run under bf16 autocast in channels_last
(`student_precision` auto; the parameters, test statistics and losses stay fp32): on
bench/tta's drive a bf16 student (forced on the CPU) scored 17.6 mIoU, as fp32 did
(bench/results/tta_student_bf16.md).

Before all that, the frame is routed (see `bank`): a frame that looks like the training data
(home) is served by the source state and teaches nothing; any other goes to the adapted state
of its condition, swapped in when the condition changes. `StepReport.switched` says when the
state changed, so the worker pushes it to the runtime at once.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adapt_deploy.adapt.losses import weak_label_loss
from adapt_deploy.config import InputConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.errors import UserError
from adapt_deploy.export.source_stats import SourceStats
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.prediction import predicted_classes
from adapt_deploy.models.signature import SignatureProbe, distance
from adapt_deploy.ops.pooling import attention_pool, lse_pool
from adapt_deploy.runtime import graph_policy
from adapt_deploy.runtime.cuda_graphs import GraphedForward
from adapt_deploy.runtime.cuda_streams import adaptation_stream
from adapt_deploy.runtime.graph_policy import graphs_env_off
from adapt_deploy.runtime.torch_inference import LogitsInference, check_precision, cuda_has_bf16
from adapt_deploy.tta.bank import HOME, ConditionBank, Route
from adapt_deploy.tta.bn import MixedBatchNorm2d, deployed_statistics, mix_batchnorms, set_adapting
from adapt_deploy.tta.options import AdaptOptions
from adapt_deploy.tta.safety import (
    CollapseMonitor,
    Observation,
    all_finite,
    ema_update,
    stochastic_restore,
)

STATE_FORMAT = "adapt-deploy/tta-state"
STATE_VERSION = 2  # 2: the condition bank; a version-1 file resumes without one
PREDICTED_SHARE = 0.001  # a class is predicted when it holds this share of the argmax pixels
NEVER = 1e4  # the LSE cut of a class never present on the source: it is never pseudo-labelled


@dataclass
class StepReport:
    """What one step did: an update, or (`observation` None) nothing for a home frame."""

    update: int
    loss: float
    losses: dict[str, float]
    observation: Observation | None
    seconds: float
    reset: str | None = None  # why the adapter went back to the source weights after it
    switched: str | None = None  # the state now served, when this frame changed it
    condition: str = "all"  # the frame's condition: "home", "condition N" ("all": no bank)


@dataclass
class Counters:
    """Totals over the adapter's life (saved with its state)."""

    updates: int = 0
    rollbacks: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # resets by kind: collapse, periodic

    @property
    def resets(self) -> int:
        return sum(self.reasons.values())

    @property
    def collapses(self) -> int:
        return self.reasons.get("collapse", 0)


class OnlineAdapter:
    """See the module docstring. Not thread-safe: one thread steps it (see `worker`)."""

    def __init__(
        self,
        model: DeepLab,
        input_spec: InputConfig,
        stats: SourceStats,
        options: AdaptOptions,
        size: tuple[int, int],
        lse_k: float = 1.0,
        checkpoint_sha256: str = "",
        *,
        teacher_precision: str = "fp32",
        cuda_graph: bool | None = None,
    ) -> None:
        """`teacher_precision`: the teacher forward's precision (fp16 on CUDA only);
        `cuda_graph`: replay the teacher forward from a CUDA graph (None: on CUDA, unless
        ADAPT_DEPLOY_CUDA_GRAPHS=0); `notes` says what was not honoured."""
        self.options = options.check()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.input_spec = input_spec
        self.stats = stats
        self.size = (int(size[0]), int(size[1]))
        self.lse_k = lse_k
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = next(model.parameters()).device
        self._stream = (  # None on the CPU, or when ADAPT_DEPLOY_ADAPTER_STREAM=shared
            adaptation_stream(self.device) if self.device.type == "cuda" else None
        )
        model = model.eval()
        self.source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in self.source_state.items():  # the test averages hold no frame yet
            if name.endswith("num_batches_tracked"):
                value.zero_()
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self._teacher_notes: tuple[str, ...] = ()
        self._bank_notes: tuple[str, ...] = ()
        self._teacher_forward = self._teacher_runner(teacher_precision, cuda_graph)
        self.student = copy.deepcopy(model).eval()
        mix_batchnorms(self.student, options.bn_prior, options.bn_momentum)
        self._mixed = {
            name: m for name, m in self.student.named_modules() if isinstance(m, MixedBatchNorm2d)
        }
        self._kept = sorted(source_layers(self.student, options.source_stages))
        self._adapted = [m for name, m in self._mixed.items() if name not in self._kept]
        for name in self._kept:  # the source statistics, always: never averaged, λ = 1
            self._mixed[name].prior = 1.0
        self.student_precision = self._student_precision()
        if self.student_precision == "bf16":  # the layout tensor cores read, as in training
            self.student.to(memory_format=torch.channels_last)
        self.trainable = self._select_trainable()
        names = {id(p): n for n, p in self.student.named_parameters()}
        self._source_trainable = [self.source_state[names[id(p)]] for p in self.trainable]
        self.optimizer = torch.optim.SGD(self.trainable, lr=options.lr, momentum=options.momentum)
        self.monitor = CollapseMonitor(
            stats.entropy,
            stats.predicted_classes,
            entropy_share=options.collapse_entropy,
            classes_share=options.collapse_classes,
        )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.counters = Counters()
        self._offsets = self._threshold_offsets()
        self._prototypes = torch.as_tensor(stats.prototypes, dtype=torch.float32).to(self.device)
        self._has_prototype = torch.as_tensor(stats.prototype_counts > 0).to(self.device)
        self._changing = self._changing_tensors()
        self._synced = {
            role: {k: t.detach().clone() for k, t in ts.items()}
            for role, ts in self._changing.items()
        }
        self._source_changing = {
            role: {k: self.source_state[k] for k in ts} for role, ts in self._changing.items()
        }
        self.bank = self._make_bank() if options.bank_size else None
        self._probe = SignatureProbe(model.backbone.conv1, model.backbone.bn1)
        # The condition whose state is live: HOME (the source state) at start; None after
        # resuming a version-1 state, which belongs to no condition.
        self.active: str | int | None = HOME
        self._synced_active: str | int | None = HOME

    # ----------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------

    def _teacher_runner(self, precision: str, cuda_graph: bool | None) -> GraphedForward:
        """The teacher's logits forward: the torch backend's precision and graph machinery."""
        check_precision(precision, self.device, "teacher_precision")
        cuda = self.device.type == "cuda"
        graphs, self._teacher_notes = graph_policy.decide(
            graph_policy.check_request(cuda_graph), cuda, True, "teacher", graphs_env_off()
        )
        logits = LogitsInference(self.teacher, precision, self.device.type)
        runner = GraphedForward(
            lambda x: logits(x)["logits"], self.device, torch.float32, graphs, 1, "teacher"
        )
        self.teacher_precision = precision
        return runner

    def _student_precision(self) -> str:
        """'bf16' or 'fp32': `student_precision`, with 'auto' bf16 on a GPU that computes in
        bf16 and fp32 elsewhere; UserError for bf16 on a GPU without it."""
        wanted = self.options.student_precision
        if wanted == "auto":
            cuda = self.device.type == "cuda"
            wanted = "bf16" if cuda and cuda_has_bf16(self.device) else "fp32"
        check_precision(wanted, self.device, "student_precision")
        return wanted

    @contextmanager
    def on_own_stream(self) -> Iterator[None]:
        """On CUDA, what runs inside on the adapter's own low-priority stream (`cuda_streams`:
        the runtime's frames then never wait behind an update), after what the caller's stream
        holds (a resumed state) and finished on leaving, as other threads read the adapter's
        tensors (saves, pushes); on the CPU, or with ADAPT_DEPLOY_ADAPTER_STREAM=shared, nothing
        changes."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            self._stream.synchronize()

    @property
    def notes(self) -> list[str]:
        """What the adapter does not do as asked: a teacher CUDA graph requested on the CPU or
        turned off by the environment, a capture that failed (eager runs instead); a package
        without the home calibration."""
        return [*self._teacher_notes, *self._teacher_forward.notes, *self._bank_notes]

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits (N, C, h, w) of the network input `x`: a copy, as the
        forward's buffers are reused."""
        return self._teacher_forward(x)[0].clone()

    def _select_trainable(self) -> list[torch.nn.Parameter]:
        """Parameters of the chosen set require grad; all others are frozen."""
        self.student.requires_grad_(False)
        chosen: list[torch.nn.Parameter] = []
        if self.options.params == "all":
            chosen = list(self.student.parameters())
        else:
            for layer in self._mixed.values():
                chosen += [layer.weight, layer.bias]
            if self.options.params == "bn+head":
                chosen += list(self.student.head.parameters())
        for p in chosen:
            p.requires_grad_(True)
        return chosen

    def _changing_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state-dict tensors of student and teacher that adapting can change: the trainable
        parameters (and their EMA in the teacher) and every buffer (the BN statistics). The other
        parameters always hold the source values, so a rollback need not copy them."""
        trained = {n for n, p in self.student.named_parameters() if p.requires_grad}
        return {
            role: {
                k: v
                for k, v in model.state_dict(keep_vars=True).items()
                if not isinstance(v, torch.nn.Parameter) or k in trained
            }
            for role, model in (("student", self.student), ("teacher", self.teacher))
        }

    def _make_bank(self) -> ConditionBank:
        """The condition bank, its home the signature calibrated at export (none in packages
        written before it: then no frame is home, and `notes` says so)."""
        options, stats = self.options, self.stats
        calibrated = stats.home_signature.size > 0 and math.isfinite(stats.home_radius)
        if not calibrated:
            self._bank_notes = (
                "the bundle's adaptation package has no home signature (exported before the "
                "condition bank): no frame is recognised as home; export it again",
            )
        home = torch.as_tensor(stats.home_signature).float() if calibrated else None
        radius = options.home_distance
        if radius is None:
            radius = stats.home_radius if calibrated else 0.0
        return ConditionBank(options.bank_size, home, radius, options.condition_distance)

    @property
    def changing(self) -> dict[str, dict[str, torch.Tensor]]:
        """{role: {state-dict name: live tensor}}: what adapting can change (what the bank keeps
        per condition)."""
        return self._changing

    def _threshold_offsets(self) -> torch.Tensor:
        """The LSE value at which each class counts as present: logit(T) for a global --threshold,
        else the per-class cut calibrated on the source (finite stand-in for never-present)."""
        if self.options.threshold is not None:
            t = self.options.threshold
            cut = np.full(self.stats.num_classes, np.log(t) - np.log1p(-t))
        else:
            cut = np.nan_to_num(np.asarray(self.stats.lse_thresholds, np.float64), posinf=NEVER)
        return torch.as_tensor(cut, dtype=torch.float32).to(self.device)

    # ----------------------------------------------------------------------------------------
    # One update
    # ----------------------------------------------------------------------------------------

    def prepare(self, frame: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) → the network input (1, 3, h, w) at the adaptation size."""
        image = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)
        x = normalize(image.permute(2, 0, 1)[None], self.input_spec)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return x.contiguous()

    def pseudo_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """y_c = [p_c > T_c] from logits (N, C, h, w), as float (N, C) (compared before the
        sigmoid, which saturates at 1.0 in float32 for confident classes)."""
        return (lse_pool(logits, self.lse_k) > self._offsets).float()

    def observe(self, logits: torch.Tensor, present: torch.Tensor) -> Observation:
        """Entropy and class counts of one frame's logits (1, C, h, w)."""
        log_p = F.log_softmax(logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(1).mean() / math.log(logits.shape[1])
        share = torch.bincount(predicted_classes(logits).flatten(), minlength=logits.shape[1])
        share = share.float() / share.sum()
        predicted = int((share >= PREDICTED_SHARE).sum())
        return Observation(float(entropy), predicted, int(present.sum()))

    def step(self, frame: np.ndarray, shifted: bool = False) -> StepReport:
        """One update on one RGB uint8 frame (see the module docstring). `shifted`: the shift
        detector fired on it; without a bank that restarts the test average (a new bank entry
        starts one anyway)."""
        start = time.perf_counter()
        options = self.options
        x = self.prepare(frame)
        route = self.route(x)
        switched = self._switch(route) if route is not None else None
        condition = "all" if route is None else condition_name(route.key)
        if route is not None and route.key == HOME:
            seconds = time.perf_counter() - start
            return StepReport(self.counters.updates, 0.0, {}, None, seconds, None, switched, HOME)
        if route is None and shifted:
            for layer in self._adapted:
                layer.restart()
        prior = self._prior(route)
        for layer in self._adapted:
            layer.prior = prior
        out = self._student_forward(x)
        with torch.no_grad():  # after the student: the teacher sees this frame's statistics
            self._copy_statistics()
            teacher = self.teacher_logits(x)
            present = self.pseudo_labels(teacher)
        losses = self._losses(out["logits"], out["features"], teacher, present)
        loss = sum(w * v for w, v in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
            self.optimizer.step()
        stochastic_restore(self.trainable, self._source_trainable, options.restore, self.generator)
        self._update_teacher()
        self.counters.updates += 1
        observation = self.observe(teacher, present)
        self.monitor.observe(observation)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        reason = self.monitor.check(value, all_finite(self.trainable))
        report = StepReport(
            self.counters.updates,
            value,
            {name: float(v.detach()) for name, (_, v) in losses.items()},
            observation,
            0.0,
            switched=switched,
            condition=condition,
        )
        every = options.reset.every
        if reason is not None and (options.reset.on_collapse or reason.startswith("non-finite")):
            report.reset = f"collapse: {reason}"
        elif every and self.counters.updates % every == 0:
            report.reset = f"periodic: every {every} updates"
        if report.reset:
            self.reset(report.reset)
        report.seconds = time.perf_counter() - start
        return report

    def _student_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's forward on `x`, the frame entering the adapted layers' test statistics
        (the gradient flows through its share); under bf16 autocast in channels_last at
        `student_precision` bf16, its outputs in fp32 either way."""
        low = self.student_precision == "bf16"
        if low:
            x = x.contiguous(memory_format=torch.channels_last)
        set_adapting(self._adapted, True)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):
                out = self.student(x)
        finally:
            set_adapting(self._adapted, False)
        return {name: value.float() for name, value in out.items()}  # the losses run in fp32

    def _prior(self, route: Route | None) -> float:
        """λ of the frame's condition: `bn_prior`, or more the nearer the condition's signature
        lies to home: 1 at the home radius, fading to 0 over `prior_fade` more radii."""
        options, bank = self.options, self.bank
        if route is None or bank is None or bank.home is None or options.prior_fade <= 0:
            return options.bn_prior
        radius = bank.home_distance
        if radius <= 0:
            return options.bn_prior
        beyond = distance(bank.entries[route.key].signature, bank.home) - radius
        fade = min(1.0, max(0.0, 1.0 - beyond / (options.prior_fade * radius)))
        return max(options.bn_prior, fade)

    def _losses(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        teacher: torch.Tensor,
        present: torch.Tensor,
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """{name: (weight, value)} of the terms with a non-zero weight."""
        options = self.options
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if options.weak_weight > 0:
            lse = lse_pool(logits, self.lse_k) - self._offsets
            terms["weak"] = (options.weak_weight, weak_label_loss(lse, present))
        if options.entropy_weight > 0 or options.pixel_weight > 0:
            confidence, teacher_labels = F.softmax(teacher, dim=1).max(1)
            confident = confidence > options.confidence
            count = confident.sum().clamp(min=1)
            log_p = F.log_softmax(logits, dim=1)
        if options.entropy_weight > 0:
            entropy = -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])
            terms["entropy"] = (options.entropy_weight, (entropy * confident).sum() / count)
        if options.pixel_weight > 0:  # the teacher's confident pixels as hard labels
            picked = log_p.gather(1, teacher_labels[:, None])[:, 0]
            terms["pixel"] = (options.pixel_weight, -(picked * confident).sum() / count)
        if options.prototype_weight > 0:
            pooled = attention_pool(logits.detach(), features)  # (N, C, D)
            use = present.bool() & self._has_prototype[None]
            if bool(use.any()):
                cos = F.cosine_similarity(pooled[use], self._prototypes[use.nonzero()[:, 1]], dim=1)
                terms["prototype"] = (options.prototype_weight, (1 - cos).mean())
        return terms

    # ----------------------------------------------------------------------------------------
    # The condition bank
    # ----------------------------------------------------------------------------------------

    def signature(self, x: torch.Tensor) -> torch.Tensor:
        """The signature (2·stem channels,) of the network input `x` (1, 3, h, w): what the bank
        routes by (`models.signature`)."""
        return self._probe(x)[0]

    def route(self, x: torch.Tensor) -> Route | None:
        """Where the network input `x` goes in the bank (None: no bank)."""
        if self.bank is None:
            return None
        return self.bank.route(self.signature(x), self._source_changing)

    @torch.no_grad()
    def _switch(self, route: Route) -> str | None:
        """Make `route.key`'s state live, keeping the live one in its entry; what is served
        now, or None when nothing changed. The optimizer and monitor start over."""
        if route.key == self.active:
            return None
        assert self.bank is not None
        old = self.bank.entries.get(self.active) if isinstance(self.active, int) else None
        if old is not None:
            _copy_into(old.state, self._changing)
        new = self.bank.entries[route.key] if isinstance(route.key, int) else None
        _copy_into(self._changing, new.state if new is not None else self._source_changing)
        self.active = route.key
        self.optimizer.state.clear()
        self.monitor.reset()
        served = condition_name(route.key)
        if route.new:
            served += " (new)"
        if route.evicted is not None:
            served += f", {condition_name(route.evicted)} evicted"
        return served

    @torch.no_grad()
    def _update_teacher(self) -> None:
        """Teacher weights ← EMA of the student's (its BN statistics were copied in `step`, after
        the student's forward, the only thing that moves them)."""
        teacher = dict(self.teacher.named_parameters())
        pairs = [(teacher[n], p) for n, p in self.student.named_parameters() if p.requires_grad]
        if pairs:
            ema_update([t for t, _ in pairs], [s for _, s in pairs], self.options.ema)

    @torch.no_grad()
    def _copy_statistics(self) -> None:
        buffers = dict(self.teacher.named_buffers())
        for name, value in deployed_statistics(self._mixed).items():
            buffers[name].copy_(value)

    # ----------------------------------------------------------------------------------------
    # Resets, rollbacks, state
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self, reason: str) -> None:
        """Back to the source weights and statistics; the optimizer and monitor start over."""
        self.student.load_state_dict(self.source_state)
        for layer in self._mixed.values():
            layer.reset_statistics()
        self.teacher.load_state_dict(self.source_state)
        self.optimizer.state.clear()
        self.monitor.reset()
        key = reason.split(":")[0]
        self.counters.reasons[key] = self.counters.reasons.get(key, 0) + 1

    @torch.no_grad()
    def mark_synced(self) -> None:
        """The runtime now runs the teacher as it is: remember it for rollbacks (only the
        tensors that can change, copied into the same memory every time)."""
        _copy_into(self._synced, self._changing)
        self._synced_active = self.active

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the weights the runtime last accepted (after a failed sync)."""
        _copy_into(self._changing, self._synced)
        self.active = self._synced_active
        self.optimizer.state.clear()
        self.counters.rollbacks += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, test statistics, optimizer, counters, and the
        bank with the live state's condition."""
        c = self.counters
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "checkpoint_sha256": self.checkpoint_sha256,
            "params": self.options.params,
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "counters": {
                "updates": c.updates,
                "rollbacks": c.rollbacks,
                "reasons": dict(c.reasons),
            },
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "active": self.active,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output (checked by `state.load_state` first). A saved bank
        is dropped when this adapter has none (--adapt-bank 0); a version-1 state (no bank)
        resumes as live weights of no condition, replaced at the first routed frame."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # that restored the saved run's lr, momentum
            group["lr"] = self.options.lr
            group["momentum"] = self.options.momentum
        counters = state["counters"]
        self.counters = Counters(
            int(counters["updates"]),
            int(counters["rollbacks"]),
            {str(k): int(v) for k, v in counters["reasons"].items()},
        )
        if self.bank is not None:
            saved = state.get("bank")
            if saved is not None:
                self.bank.load_state_dict(saved, self.device)
            self.active = state.get("active") if saved is not None else None
        self._keep_source_statistics(self._changing)
        for entry in self.bank.entries.values() if self.bank is not None else ():
            self._keep_source_statistics(entry.state)
        self.mark_synced()

    @torch.no_grad()
    def _keep_source_statistics(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the source statistics in the kept layers of `tensors` (student and teacher, live
        or a bank entry's): a state saved with fewer kept stages, or before they existed, holds
        adapted ones there, which the runtime would otherwise get until the next update."""
        for role in tensors.values():
            for layer in self._kept:
                for stat in ("running_mean", "running_var", "num_batches_tracked"):
                    role[f"{layer}.{stat}"].copy_(self.source_state[f"{layer}.{stat}"])


def source_layers(model: DeepLab, stages: int) -> set[str]:
    """Names of the BN layers that keep the source statistics: those of the backbone's last
    `stages` residual stages (layer1 ... layer4) and, when `stages` > 0, any after the
    backbone. UserError when the backbone has fewer stages."""
    names = [name for name, _ in model.backbone.named_children() if name.startswith("layer")]
    if stages > len(names):
        raise UserError(
            f"--adapt-source-stages must be at most {len(names)} (the backbone's stages), "
            f"got {stages}"
        )
    if stages == 0:
        return set()
    prefixes = tuple(f"backbone.{name}." for name in names[len(names) - stages :])
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        and (name.startswith(prefixes) or not name.startswith("backbone."))
    }


def condition_name(key: str | int) -> str:
    """How reports name a bank key: 'home' or 'condition N'."""
    return key if isinstance(key, str) else f"condition {key}"


def _copy_into(
    target: dict[str, dict[str, torch.Tensor]], source: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Copy every tensor of `source` into the same-named tensor of `target`, in place."""
    for role, tensors in target.items():
        for name, value in tensors.items():
            value.copy_(source[role][name])
