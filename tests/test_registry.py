"""The registries are the one list of methods, dataset layouts and backends: every entry loads,
the config and the runtime accept exactly those names, and no method, layout or backend exists
in the package without an entry."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

from adapt_deploy import registry
from adapt_deploy.config import from_dict
from adapt_deploy.errors import ConfigError, UserError
from adapt_deploy.registry import BACKENDS, DATASET_LAYOUTS, METHODS, Entry, Registry

REGISTRIES = {"method": METHODS, "dataset layout": DATASET_LAYOUTS, "backend": BACKENDS}
PACKAGE = Path(registry.__file__).parent


def every_entry() -> list[tuple[Registry, str]]:
    return [(table, name) for table in REGISTRIES.values() for name in table.names()]


def modules_of(package: str) -> list[object]:
    """Every module of an adapt_deploy subpackage, imported."""
    pkg = importlib.import_module(f"adapt_deploy.{package}")
    found = [pkg]
    for info in pkgutil.iter_modules(pkg.__path__, f"{pkg.__name__}."):
        found.append(importlib.import_module(info.name))
    return found


@pytest.mark.parametrize(("table", "name"), every_entry(), ids=lambda v: getattr(v, "what", v))
def test_every_entry_loads_and_has_a_summary(table, name):
    assert table.load(name) is not None
    assert table.summary(name) and "\n" not in table.summary(name)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_loads_to_a_method_class_of_its_own_name(name):
    from adapt_deploy.adapt import METHOD_CLASSES, Method

    cls = METHODS.load(name)
    assert issubclass(cls, Method) and cls.name == name
    assert METHOD_CLASSES[name] is cls


def test_every_method_class_in_adapt_is_registered():
    """A Method subclass (or Method itself) anywhere in adapt/ without an entry fails here."""
    from adapt_deploy.adapt import Method

    defined = {
        cls
        for module in modules_of("adapt")
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Method) and cls.__module__.startswith("adapt_deploy.adapt")
    }
    registered = {METHODS.load(name) for name in METHODS.names()}
    assert defined == registered


@pytest.mark.parametrize("name", DATASET_LAYOUTS.names())
def test_every_layout_loads_to_a_layout(name):
    from adapt_deploy.data.datasets import Layout

    assert isinstance(DATASET_LAYOUTS.load(name), Layout)


def test_every_layout_in_data_is_registered():
    from adapt_deploy.data.datasets import Layout

    defined = {
        id(value)
        for module in modules_of("data")
        for value in vars(module).values()
        if isinstance(value, Layout)
    }
    assert defined == {id(DATASET_LAYOUTS.load(name)) for name in DATASET_LAYOUTS.names()}


def test_every_backend_module_of_the_runtime_is_registered():
    """Each runtime/*_backend.py holds one backend, and the registry names it."""
    files = {f"adapt_deploy.runtime.{p.stem}" for p in (PACKAGE / "runtime").glob("*_backend.py")}
    targets = {BACKENDS.entry(name).target.partition(":")[0] for name in BACKENDS.names()}
    assert files == targets
    for name in BACKENDS.names():
        assert inspect.isclass(BACKENDS.load(name))


def test_auto_is_a_backend_choice_but_not_a_backend():
    from adapt_deploy.runtime import selection

    assert "auto" not in BACKENDS
    assert ("auto", *BACKENDS.names()) == registry.BACKEND_CHOICES
    assert selection.BACKENDS == registry.BACKEND_CHOICES


def test_the_runtime_refuses_a_backend_that_is_not_registered():
    from adapt_deploy.runtime.selection import Device, choose

    with pytest.raises(UserError, match=r"backend: expected one of \['auto', 'onnxruntime'"):
        choose("tflite", "auto", Device(None), ["fp32"], {}, False)


@pytest.mark.parametrize("name", METHODS.names())
def test_config_accepts_every_registered_method(name):
    assert from_dict({"train": {"method": name}}).train.method == name


@pytest.mark.parametrize("name", DATASET_LAYOUTS.names())
@pytest.mark.parametrize("split", ["source", "target", "val"])
def test_config_accepts_every_registered_layout(name, split):
    config = from_dict({"data": {split: {"kind": name}}})
    assert getattr(config.data, split).kind == name


@pytest.mark.parametrize(
    ("raw", "key", "table"),
    [
        ({"train": {"method": "magic"}}, "train.method", METHODS),
        ({"data": {"source": {"kind": "kitti"}}}, "data.source.kind", DATASET_LAYOUTS),
        ({"data": {"val": {"kind": "kitti"}}}, "data.val.kind", DATASET_LAYOUTS),
    ],
)
def test_config_refuses_an_unregistered_name_naming_the_key_and_the_choices(raw, key, table):
    with pytest.raises(ConfigError) as err:
        from_dict(raw, source="bad.yaml")
    assert f"bad.yaml: config key '{key}' must be one of {list(table.names())}, got" in str(
        err.value
    )


def test_check_returns_a_registered_name_and_refuses_another():
    assert DATASET_LAYOUTS.check("gta5", "--kind") == "gta5"
    with pytest.raises(UserError, match=r"--kind must be one of \['gta5', .*got 'kitti'"):
        DATASET_LAYOUTS.check("kitti", "--kind")


def test_unknown_names_are_key_errors_listing_the_names():
    with pytest.raises(KeyError, match="unknown method 'magic'"):
        METHODS.load("magic")


def test_help_lists_the_names():
    assert Registry("x", (Entry("a", "m:a", "A"),)).help() == "a"
    assert METHODS.help().startswith("source_only, adaptsegnet") and " or oracle" in METHODS.help()


@pytest.mark.parametrize(
    "entries",
    [
        (Entry("a", "m:a", "A"), Entry("a", "m:b", "B")),  # a name twice
        (Entry("a", "m.a", "A"),),  # no attribute
    ],
)
def test_a_malformed_table_is_refused_when_written(entries):
    with pytest.raises(ValueError):
        Registry("x", entries)


def test_the_registry_imports_nothing_it_names():
    """A fresh interpreter: importing the registry (and config) loads no method, layout,
    backend or torch; only `load` does."""
    import subprocess
    import sys

    script = (
        "import sys, adapt_deploy.registry, adapt_deploy.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith(('adapt_deploy.adapt', 'adapt_deploy.data', 'adapt_deploy.runtime'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bundle_backends_are_the_registered_ones_that_run_bundle_files():
    from typer.testing import CliRunner

    from adapt_deploy.cli import app
    from adapt_deploy.export.verify import ort_device

    assert set(registry.BUNDLE_BACKENDS) == (set(BACKENDS.names()) - {"torch"}) | {
        registry.ONNXRUNTIME_CUDA
    }
    for command in ("verify", "evaluate"):
        shown = " ".join(CliRunner().invoke(app, [command, "--help"]).output.split())
        assert all(name in shown for name in registry.BUNDLE_BACKENDS), command
    with pytest.raises(UserError, match=r"--backend must be one of \['onnxruntime', 'tensorrt'"):
        ort_device("openvino")
