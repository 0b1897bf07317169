import pytest
import torch
from conftest import method_overrides

from adapt_deploy.adapt import METHOD_CLASSES
from adapt_deploy.config import load_config
from adapt_deploy.data.weak import write_class_stats, write_points
from adapt_deploy.engine.train import build_learner, train
from adapt_deploy.errors import DatasetError
from adapt_deploy.models.checkpoints import read_checkpoint
from adapt_deploy.registry import METHODS


@pytest.fixture
def weak_labels(cityscapes_root):
    """The target's class statistics and point labels, as the CLI writes them."""
    write_class_stats(cityscapes_root, "cityscapes", "train")
    write_points(cityscapes_root, "cityscapes", "train", seed=0)
    return cityscapes_root


def test_every_registered_method_has_a_recipe():
    assert tuple(METHOD_CLASSES) == METHODS.names()


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_trains_and_resumes(tmp_path, tiny_config_file, weak_labels, method):
    needs = method_overrides(method, tiny_config_file, tmp_path)
    overrides = [f"train.method={method}", "train.iterations=2", "adapt.lambda_adv=0.1", *needs]
    config = load_config(tiny_config_file, overrides)
    train(config, tmp_path / "run", evaluate_at_end=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    longer = load_config(
        tiny_config_file, [overrides[0], "train.iterations=3", overrides[2], *needs]
    )
    result = train(longer, tmp_path / "run", resume=True, evaluate_at_end=False)
    assert result.iterations == 3
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)
    assert set(state["discriminators"]) == set(state["d_optimizers"])
    assert read_checkpoint(result.checkpoint)["meta"]["method"] == method


def test_methods_log_their_own_losses(tmp_path, tiny_config_file, weak_labels):
    config = load_config(tiny_config_file, ["train.method=wda_point", "train.iterations=1"])
    train(config, tmp_path / "run", evaluate_at_end=False)
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    for key in ("seg", "adv", "weak", "cat_adv", "point", "d_out", "d_cat"):
        assert f'"{key}"' in logged


@pytest.mark.parametrize(
    ("method", "missing"), [("wda_image", "data stats"), ("wda_point", "data")]
)
def test_missing_target_weak_labels_say_how_to_make_them(
    tmp_path, tiny_config_file, method, missing
):
    config = load_config(tiny_config_file, [f"train.method={method}"])
    with pytest.raises(DatasetError, match=f"adapt-deploy {missing}"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_points_are_required_beyond_the_statistics(tmp_path, tiny_config_file, cityscapes_root):
    write_class_stats(cityscapes_root, "cityscapes", "train")
    config = load_config(tiny_config_file, ["train.method=wda_point"])
    with pytest.raises(DatasetError, match="adapt-deploy data points"):
        train(config, tmp_path / "run")


def test_source_calibration_resumes_with_its_running_averages(tmp_path, tiny_config_file):
    overrides = ["train.method=wda_uda", "adapt.pseudo_calibration=source"]
    config = load_config(tiny_config_file, [*overrides, "train.iterations=2"])
    train(config, tmp_path / "run", evaluate_at_end=False)
    saved = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)["method"]
    assert not saved["calibration"]["present"].isnan().all()  # two source batches folded in

    learner = build_learner(config, torch.device("cpu"))
    learner.load_state_dict(torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True))
    restored = learner.method.calibration.state_dict()
    for side in ("present", "absent"):
        torch.testing.assert_close(restored[side], saved["calibration"][side], equal_nan=True)
