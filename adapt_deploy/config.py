"""Typed experiment configuration: dataclasses, YAML loading and dotted `--set` overrides.

Every key is checked against the schema before any work starts: an unknown key or a value of
the wrong type raises ConfigError naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapt_deploy import registry
from adapt_deploy.errors import ConfigError
from adapt_deploy.labels import EVAL_PROTOCOLS

# The registry's names, for callers that only need the choices (the registry is the source).
METHODS = registry.METHODS.names()  # train.method
DATASET_KINDS = registry.DATASET_LAYOUTS.names()  # data.*.kind: the dataset layouts
GAN_MODES = ("bce", "lsgan")
BN_STATS = ("target", "all")  # selftrain.bn_stats
WEIGHTINGS = ("image", "pixel")  # selftrain.weighting
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision
PSEUDO_CALIBRATIONS = ("none", "source")
IMAGE_LABEL_MODES = ("fraction", "any")
COLOR_ORDERS = ("RGB", "BGR")
# model.init_format: how to read model.init (models/weight_formats.py); auto detects from the keys
INIT_FORMATS = ("auto", "adapt_deploy", "deeplab_v2", "torchvision")
POINT_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # adapt.points: a file name part
SOURCE_MIXINGS = ("alternate", "mix")  # data.source_mixing
# The methods that train on several labelled sources (data.sources).
MULTI_SOURCE_METHODS = ("multisource",)


@dataclass
class DatasetConfig:
    """One split of one dataset, resized as the field does it (bicubic images, nearest labels)."""

    kind: str = "cityscapes"
    root: str = ""
    split: str = "train"
    size: list[int] = field(default_factory=lambda: [512, 1024])  # (height, width) after resize
    # data.sources entries only: the trainIds this source labels (its segmentation loss leaves
    # the others out of the softmax). None: the layout's (synthia 16 classes, gta5/cityscapes 19).
    classes: list[int] | None = None


@dataclass
class DataConfig:
    """Where the labelled source, the target and the target evaluation split live."""

    source: DatasetConfig = field(
        default_factory=lambda: DatasetConfig("gta5", "data/GTA5", "train", [720, 1280])
    )
    # Several labelled sources (train.method multisource, 2 or more entries): they replace
    # data.source in training, which then only names the source export's statistics read (set
    # it to one of them). Each entry may set `classes`. CycleGAN-translated sources are data
    # the user brings: give the translated root here as any other source.
    sources: list[DatasetConfig] = field(default_factory=list)
    # How a batch draws from data.sources: "alternate" (iteration i takes its whole batch from
    # source i mod S) or "mix" (every batch holds batch_size / S images of each source).
    source_mixing: str = "alternate"
    # FDA (data/fda.py): each source image takes the low-frequency amplitude of a target train
    # image, in a centred square of side 2 * floor(fda_beta * min(H, W)) + 1 of its spectrum;
    # 0 is off, the paper uses 0.01-0.09.
    fda_beta: float = 0.0
    target: DatasetConfig = field(
        default_factory=lambda: DatasetConfig("cityscapes", "data/Cityscapes", "train")
    )
    val: DatasetConfig = field(
        default_factory=lambda: DatasetConfig("cityscapes", "data/Cityscapes", "val")
    )
    num_workers: int = 2
    cache: bool = False  # keep decoded, resized samples in memory (small datasets only)


@dataclass
class InputConfig:
    """How pixels are normalized before the network: (x[order] - mean) / std in 0-255 units."""

    color_order: str = "BGR"
    mean: list[float] = field(default_factory=lambda: [104.008, 116.669, 122.679])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


@dataclass
class ModelConfig:
    """DeepLab-v2 architecture."""

    backbone: str = "resnet101"
    num_classes: int = 19
    width: int = 64
    freeze_bn: bool = True
    aspp_branches: int = 4
    # Start from these weights: a checkpoint.pt of this project, or released DeepLab-v2 or
    # torchvision ResNet weights (docs/weights.md). init_strict=false loads what matches.
    init: str | None = None
    init_format: str = "auto"  # auto | adapt_deploy | deeplab_v2 | torchvision
    init_strict: bool = True


@dataclass
class OptimConfig:
    """SGD with a poly schedule; the head trains at `head_lr_mult` times the lr."""

    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    schedule_iters: int = 250_000  # the poly decay runs over this many iterations
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass
class AdaptConfig:
    """Loss weights and settings of the adaptation methods (official defaults)."""

    lambda_adv: float = 0.001  # output-space adversarial (AdaptSegNet, ADVENT, WDA)
    lambda_ent: float = 0.001  # entropy minimization (ADVENT MinEnt)
    lambda_weak: float = 0.01  # weak-label classification loss L_c (0.2 with oracle labels)
    lambda_cw: float = 0.001  # category-wise adversarial loss L_adv^C
    lambda_point: float = 1.0  # point supervision
    cw_hidden: int = 2048  # hidden width of the category-wise discriminators' MLPs
    ndf: int = 64  # channels of the output-space discriminator's first conv (doubling after)
    pseudo_threshold: float = 0.2  # T of the pseudo-weak labels
    pseudo_calibration: str = "none"  # none (Eq. 7, the paper) | source (adapt/calibration.py)
    lse_k: float = 1.0  # k of LSE pooling
    dropout: float = 0.1  # applied to the logits before LSE pooling
    gan: str = "bce"  # bce | lsgan
    lr_d: float = 1e-4  # discriminators: Adam, betas (0.9, 0.99), same poly decay
    image_labels: str = "fraction"  # fraction (official) | any (any labelled pixel)
    point_seed: int = 0  # which drawn point annotation to use (`data points --seed`)
    # A named point set in place of the drawn one: the answers `data import-points` stored
    # (wda_point, selftrain_point and labor_* read it); "" uses the drawn set of point_seed.
    points: str = ""


@dataclass
class SelfTrainConfig:
    """Self-training methods (adapt/self_training.py, adapt/selftrain.py; IntraDA: adapt/ranking.py
    and advent.IntraDomain)."""

    # CBST / CRST: train.iterations split into `rounds`; each round first pseudo-labels the
    # target train split keeping per class the top `portion` of its confident pixels, the
    # portion growing by `portion_step` per round up to `portion_max` (CRST: 0.2, 0.05, 0.5).
    rounds: int = 3
    portion: float = 0.2
    portion_step: float = 0.05
    portion_max: float = 0.5
    lambda_target: float = 1.0  # weight of the target's pseudo-label cross-entropy
    lambda_kld: float = 0.1  # CRST-MRKLD: KL(uniform || p) on pseudo-labelled pixels
    lrent_alpha: float = 0.25  # CRST-LRENT: soft labels (p / k) ** (1 / alpha), normalized
    # The teacher-student recipe (DACS / DAFormer): EMA teacher, class-mix, rare-class sampling.
    ema: float = 0.999  # teacher = ema * teacher + (1 - ema) * student after every step
    confidence: float = 0.968  # tau: a pseudo-label's weight is the share of pixels above it
    # "image": every target pixel weighs its image's share of pixels above tau (DACS, DAFormer);
    # "pixel": a pixel weighs 1 when its own confidence is above tau, else 0.
    weighting: str = "image"
    class_mix: bool = True  # paste half of a source image's classes onto the target
    rare_class_temperature: float = 0.01  # source sampling by class frequency; 0: uniform
    # Where BatchNorm's running statistics come from when BN trains (model.freeze_bn false):
    # "target", the passes over target-domain images only (the source pass normalizes with its
    # batch's statistics and leaves them), so the teacher and the saved model normalize as the
    # target needs; "all", every pass, as plain training does.
    bn_stats: str = "target"
    # IntraDA: the rank.json `adapt-deploy rank` wrote (the target's easy/hard split and the
    # easy part's pseudo-labels); model.init must be the checkpoint it ranked with.
    rank: str | None = None


@dataclass
class LaborConfig:
    """LabOR (adapt/labor.py): which target pixels to ask for, how many, and when.

    The labor_* methods train AdaptSegNet plus a second classifier (the pixel selector) and,
    in `rounds` rounds, ask for pixels by the method's strategy (ppl, spl, random, entropy),
    answered from the target train split's ground truth (the simulated annotator the
    benchmarks use). rounds 0: no asking during training; the labels are the point set
    adapt.points, imported from a human annotator's answers (`suggest-points`, `data
    import-points`).
    """

    # Pixels asked per image over all rounds (ppl, random, entropy: 40 as the paper's PPL).
    # spl asks for the whole inconsistency mask; a budget there caps it. null: the default.
    budget: int | None = None
    rounds: int = 2
    warmup: float = 0.1  # share of train.iterations before the first round
    lambda_target: float = 1.0  # cross-entropy on the labelled target pixels (both classifiers)
    lambda_dis: float = 0.01  # cosine similarity of the two classifiers' weights (CLAN's)
    # Source cross-entropy (both classifiers) once target labels exist: before them it is 1,
    # so that the selector's first round has learnt something. 1 = the paper.
    lambda_source: float = 1.0


@dataclass
class TrainConfig:
    """The training loop."""

    method: str = "source_only"
    iterations: int = 120_000  # where training stops
    batch_size: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 5000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_protocol: str = "cityscapes19"  # cityscapes19 | synthia16 (reports mIoU-16 and -13)
    # Mixed precision: fp32 | bf16 | fp16 (fp16 with a gradient scaler). Losses, pooling
    # reductions and discriminator outputs stay fp32; checkpoints stay fp32.
    precision: str = "fp32"
    compile: bool = False  # torch.compile the segmentation model's forward
    eval_every: int = 0  # evaluate on data.val every this many iterations (0: at the end only)
    tensorboard: bool | None = None  # TensorBoard event files; None: when tensorboard imports


@dataclass
class ExperimentConfig:
    """Everything one training run needs."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    labor: LaborConfig = field(default_factory=LaborConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML/JSON-serializable)."""
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply `key.sub=value` overrides and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-4, true, [1, 2])."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Build a validated ExperimentConfig from a nested dict."""
    config = _build(ExperimentConfig, raw, source, prefix="")
    validate(config, source)
    return config


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"{source}: unknown config key {key!r}; known keys here: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(h for h in options if h is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _type_error(source, key, f"a list of {item_hint.__name__}", value)
        return [_coerce(item_hint, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise _type_error(source, key, hint.__name__, value)
    return value


def _type_error(source: str, key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(
        f"{source}: config key {key!r} expects {expected}, got {value!r} ({type(value).__name__})"
    )


def validate(config: ExperimentConfig, source: str) -> None:
    """Check values the type system cannot: choices, ranges, list lengths."""
    _check_finite(config, source, "")
    o, m = config.optim, config.model
    checks: list[tuple[bool, str, str]] = [
        (o.lr >= 0, "optim.lr", "a learning rate of 0 or more"),
        (o.head_lr_mult > 0, "optim.head_lr_mult", "positive"),
        (0 <= o.momentum < 1, "optim.momentum", "in [0, 1)"),
        (o.weight_decay >= 0, "optim.weight_decay", "0 or more"),
        (o.poly_power >= 0, "optim.poly_power", "0 or more"),
        (o.grad_clip >= 0, "optim.grad_clip", "0 (off) or a positive gradient norm"),
        (m.width > 0, "model.width", "a positive integer (64 is the standard ResNet)"),
        (1 <= m.aspp_branches <= 4, "model.aspp_branches", "1 to 4"),
        (m.init_format in INIT_FORMATS, "model.init_format", f"one of {list(INIT_FORMATS)}"),
        (config.train.log_every > 0, "train.log_every", "a positive integer"),
        (config.train.checkpoint_every > 0, "train.checkpoint_every", "a positive integer"),
        (config.train.method in METHODS, "train.method", f"one of {list(METHODS)}"),
        (config.input.color_order in COLOR_ORDERS, "input.color_order", f"one of {COLOR_ORDERS}"),
        (len(config.input.mean) == 3, "input.mean", "3 values"),
        (
            len(config.input.std) == 3 and min(config.input.std) > 0,
            "input.std",
            "3 positive values",
        ),
        (config.model.num_classes > 0, "model.num_classes", "a positive integer"),
        (
            config.train.eval_protocol in EVAL_PROTOCOLS,
            "train.eval_protocol",
            f"one of {sorted(EVAL_PROTOCOLS)}",
        ),
        (config.train.iterations > 0, "train.iterations", "a positive integer"),
        (config.train.precision in PRECISIONS, "train.precision", f"one of {list(PRECISIONS)}"),
        (config.train.batch_size > 0, "train.batch_size", "a positive integer"),
        (config.train.eval_every >= 0, "train.eval_every", "0 (at the end only) or more"),
        (config.optim.schedule_iters > 0, "optim.schedule_iters", "a positive integer"),
        (config.data.num_workers >= 0, "data.num_workers", "0 or more"),
    ]
    a = config.adapt
    for key in ("lambda_adv", "lambda_ent", "lambda_weak", "lambda_cw", "lambda_point", "lr_d"):
        checks.append((getattr(a, key) >= 0, f"adapt.{key}", "0 or more (a loss weight)"))
    checks += [
        (0 < a.pseudo_threshold < 1, "adapt.pseudo_threshold", "between 0 and 1"),
        (a.lse_k > 0, "adapt.lse_k", "positive"),
        (a.cw_hidden > 0, "adapt.cw_hidden", "a positive integer"),
        (a.ndf > 0, "adapt.ndf", "a positive integer"),
        (0 <= a.dropout < 1, "adapt.dropout", "in [0, 1)"),
        (a.gan in GAN_MODES, "adapt.gan", f"one of {list(GAN_MODES)}"),
        (
            a.pseudo_calibration in PSEUDO_CALIBRATIONS,
            "adapt.pseudo_calibration",
            f"one of {list(PSEUDO_CALIBRATIONS)}",
        ),
        (a.image_labels in IMAGE_LABEL_MODES, "adapt.image_labels", f"one of {IMAGE_LABEL_MODES}"),
        (
            a.pseudo_calibration == "none" or config.train.method == "wda_uda",
            "adapt.pseudo_calibration",
            "'none' unless train.method is wda_uda (the only method with pseudo-weak labels)",
        ),
    ]
    st = config.selftrain
    checks += [
        (st.rounds > 0, "selftrain.rounds", "a positive number of rounds"),
        (0 < st.portion <= 1, "selftrain.portion", "in (0, 1]"),
        (st.portion_step >= 0, "selftrain.portion_step", "0 or more"),
        (st.portion <= st.portion_max <= 1, "selftrain.portion_max", "in [portion, 1]"),
        (st.lambda_target >= 0, "selftrain.lambda_target", "0 or more (a loss weight)"),
        (st.lambda_kld >= 0, "selftrain.lambda_kld", "0 or more (a loss weight)"),
        (st.lrent_alpha > 0, "selftrain.lrent_alpha", "positive"),
        (st.bn_stats in BN_STATS, "selftrain.bn_stats", f"one of {list(BN_STATS)}"),
        (st.weighting in WEIGHTINGS, "selftrain.weighting", f"one of {list(WEIGHTINGS)}"),
        (0 <= st.ema < 1, "selftrain.ema", "in [0, 1)"),
        (0 <= st.confidence < 1, "selftrain.confidence", "in [0, 1)"),
        (st.rare_class_temperature >= 0, "selftrain.rare_class_temperature", "0 or more"),
    ]
    lb = config.labor
    checks += [
        (lb.budget is None or lb.budget > 0, "labor.budget", "a positive pixel count or null"),
        (lb.rounds >= 0, "labor.rounds", "0 (imported labels only) or more"),
        (0 <= lb.warmup < 1, "labor.warmup", "a share of train.iterations in [0, 1)"),
        (lb.lambda_target >= 0, "labor.lambda_target", "0 or more (a loss weight)"),
        (lb.lambda_dis >= 0, "labor.lambda_dis", "0 or more (a loss weight)"),
        (lb.lambda_source >= 0, "labor.lambda_source", "0 or more (a loss weight)"),
        (
            not a.points or POINT_SET_NAME.match(a.points) is not None,
            "adapt.points",
            "a point set name (letters, digits, '_', '-', '.') or empty",
        ),
    ]
    for name in ("source", "target", "val"):
        ds: DatasetConfig = getattr(config.data, name)
        checks.append(
            (ds.kind in DATASET_KINDS, f"data.{name}.kind", f"one of {list(DATASET_KINDS)}")
        )
        checks.append(
            (len(ds.size) == 2 and min(ds.size) > 0, f"data.{name}.size", "[height, width] > 0")
        )
    checks.append(
        (
            config.data.source_mixing in SOURCE_MIXINGS,
            "data.source_mixing",
            f"one of {list(SOURCE_MIXINGS)}",
        )
    )
    checks.append((0 <= config.data.fda_beta < 0.5, "data.fda_beta", "in [0, 0.5) (0: off)"))
    for name in ("source", "target", "val"):
        checks.append(
            (
                getattr(config.data, name).classes is None,
                f"data.{name}.classes",
                "unset (classes is read for data.sources entries only)",
            )
        )
    for ok, key, expected in checks:
        if not ok:
            value = _lookup(config, key)
            raise ConfigError(f"{source}: config key {key!r} must be {expected}, got {value!r}")
    _validate_sources(config, source)


def _validate_sources(config: ExperimentConfig, source: str) -> None:
    """data.sources: each entry as data.source, 2 or more of them, a method that trains on
    them, and (mixing "mix") equal sizes and a batch that splits evenly among them."""
    sources, method = config.data.sources, config.train.method

    def fail(key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{source}: config key {key!r} must be {expected}, got {value!r}")

    if not sources:  # a multi-source method without them fails when it trains (method_data)
        return
    if len(sources) < 2:
        raise fail("data.sources", "2 or more entries (one source: use data.source)", sources)
    if method not in MULTI_SOURCE_METHODS:
        raise ConfigError(
            f"{source}: config key 'data.sources' is read by train.method "
            f"{' or '.join(MULTI_SOURCE_METHODS)} only, but train.method is {method!r}: set "
            "train.method to one of those, or use data.source"
        )
    classes = config.model.num_classes
    for i, entry in enumerate(sources):
        key = f"data.sources[{i}]"
        if entry.kind not in DATASET_KINDS:
            raise fail(f"{key}.kind", f"one of {list(DATASET_KINDS)}", entry.kind)
        if len(entry.size) != 2 or min(entry.size) <= 0:
            raise fail(f"{key}.size", "[height, width] > 0", entry.size)
        ids = entry.classes
        if ids is not None and (
            not ids or len(set(ids)) != len(ids) or not all(0 <= c < classes for c in ids)
        ):
            raise fail(f"{key}.classes", f"distinct trainIds in [0, {classes})", ids)
    if config.data.source_mixing == "mix":
        sizes = [e.size for e in sources]
        if any(size != sizes[0] for size in sizes):
            raise fail(
                "data.sources[*].size", "the same for every source under mixing 'mix'", sizes
            )
        if config.train.batch_size % len(sources):
            raise fail(
                "train.batch_size",
                f"a multiple of the {len(sources)} sources under data.source_mixing 'mix'",
                config.train.batch_size,
            )


def _check_finite(node: Any, source: str, prefix: str) -> None:
    """ConfigError naming the first float (or list item) that is NaN or infinite."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, source, key + ".")
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(
                    f"{source}: config key {key!r} must be a finite number, got {value!r}"
                )


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def dump_config(config: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (saved beside every run for reproducibility)."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
