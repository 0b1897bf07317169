from pathlib import Path

import pytest

from adapt_deploy.config import apply_override, from_dict, load_config
from adapt_deploy.errors import ConfigError
from adapt_deploy.registry import METHODS

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.method == path.stem


def test_every_method_has_a_synthetic_config():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    assert {f"synthetic/{m}.yaml" for m in METHODS.names()} <= names


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {iterations: 5}\n")
    config = load_config(
        path, ["optim.lr=1e-3", "model.freeze_bn=false", "data.source.size=[8, 16]"]
    )
    assert config.optim.lr == 1e-3 and config.model.freeze_bn is False
    assert config.data.source.size == [8, 16] and config.train.iterations == 5


def test_integer_is_accepted_for_a_float():
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"optim": {"lrr": 0.1}}, "unknown config key 'optim.lrr'"),
        ({"colour": 1}, "unknown config key 'colour'"),
        ({"train": {"iterations": "many"}}, "'train.iterations' expects int, got 'many'"),
        ({"train": {"iterations": True}}, "'train.iterations' expects int"),
        ({"model": {"freeze_bn": "yes"}}, "'model.freeze_bn' expects bool"),
        ({"data": {"source": {"size": 512}}}, "'data.source.size' expects a list of int"),
        ({"train": {"method": "magic"}}, "'train.method' must be one of"),
        ({"optim": 3}, "optim must be a mapping"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_dict(raw, source="bad.yaml")


def test_bad_config_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {iterations: 5\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"adapt": {"lambda_weak": -0.1}}, "adapt.lambda_weak"),
        ({"adapt": {"gan": "w"}}, "adapt.gan"),
        ({"adapt": {"pseudo_calibration": "target"}}, "adapt.pseudo_calibration"),
        (  # wda_image uses the target's image labels: no pseudo-weak labels to calibrate
            {"adapt": {"pseudo_calibration": "source"}, "train": {"method": "wda_image"}},
            "adapt.pseudo_calibration",
        ),
    ],
)
def test_bad_adaptation_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(raw, source="bad.yaml")


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "optim.lr")


def test_unknown_backbone_is_refused_where_backbones_are_defined():
    """config.py does not know the backbones (models does): building the model names the key."""
    from adapt_deploy.models.checkpoints import build_model

    config = from_dict({"model": {"backbone": "vgg16"}}, source="bad.yaml")
    with pytest.raises(ConfigError, match=r"'model.backbone' must be one of \['resnet101'"):
        build_model(config.model)
