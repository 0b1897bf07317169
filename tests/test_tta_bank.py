"""The condition bank: frames routed home or to their condition's adapted state, each state kept
while another condition is served and restored exactly when its condition returns, the runtime
serving the bundle's own weights at home, eviction, and the bank in saved states.

Routing is made deterministic by repeating one frame per condition (its signature is the same
every time) and, where home matters, by setting the home signature to a chosen frame's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tta import SIZE, adapter_for, shifted, varied_scene
from test_tta import trained as trained  # the module fixture: a tiny trained bundle

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.errors import UserError
from adapt_deploy.export.adaptation_package import load_package
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.signature import distance
from adapt_deploy.runtime import Segmenter
from adapt_deploy.tta.adapter import OnlineAdapter
from adapt_deploy.tta.bank import HOME, ConditionBank
from adapt_deploy.tta.state import load_state, resume, save_state
from adapt_deploy.tta.sync import make_sync
from adapt_deploy.tta.worker import AdaptWorker


def _frames() -> dict[str, np.ndarray]:
    """One frame per condition: the source look (home), a bluer dusk, a dark night."""
    clear = varied_scene(np.random.default_rng(3), *SIZE)[0]
    night = (clear.astype(np.float32) * 0.25).astype(np.uint8)
    return {"home": clear, "dusk": shifted(clear), "night": night}


def _live(adapter: OnlineAdapter) -> dict[str, dict[str, torch.Tensor]]:
    return {r: {k: v.detach().clone() for k, v in t.items()} for r, t in adapter.changing.items()}


def _same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(a[r][k], b[r][k]) for r in a for k in a[r])


def _banked(bundle: Path, **options) -> OnlineAdapter:
    """An adapter with a bank whose home is exactly the `home` frame's signature."""
    adapter = adapter_for(bundle, bank_size=options.pop("bank_size", 4), **options)
    assert adapter.bank is not None
    adapter.bank.home = adapter.signature(adapter.prepare(_frames()["home"]))
    adapter.bank.home_distance = 0.05
    return adapter


def test_the_test_frames_are_distinct_conditions(trained):
    bundle, _ = trained
    adapter = _banked(bundle)
    signature = {k: adapter.signature(adapter.prepare(v)) for k, v in _frames().items()}
    assert distance(signature["dusk"], signature["night"]) > 0.5
    for name in ("dusk", "night"):
        assert distance(signature[name], signature["home"]) > 0.5


def test_home_frames_are_served_the_source_state_and_teach_nothing(trained):
    bundle, _ = trained
    adapter = _banked(bundle)
    source = _live(adapter)
    report = adapter.step(_frames()["home"])
    assert report.observation is None and report.condition == HOME and report.switched is None
    assert adapter.counters.updates == 0 and _same(_live(adapter), source)
    for _ in range(3):
        report = adapter.step(_frames()["dusk"])
    assert report.observation is not None and adapter.counters.updates == 3
    assert not _same(_live(adapter), source)
    back = adapter.step(_frames()["home"])
    assert back.switched == HOME and back.observation is None
    assert _same(_live(adapter), source)  # the source state again, exactly


def test_a_returning_condition_gets_its_own_state_back_exactly(trained):
    bundle, _ = trained
    # a checkpoint whose BN layers counted their training batches: each condition's test
    # average still starts from its first frame (the count is the average's, not training's)
    adapter = _banked(bundle, batches_tracked=5000)
    frames = _frames()
    first = adapter.step(frames["dusk"])
    assert first.switched == "condition 0 (new)" and first.condition == "condition 0"
    adapter.step(frames["dusk"])
    dusk = _live(adapter)
    night = adapter.step(frames["night"])
    assert night.switched == "condition 1 (new)"
    assert int(adapter._mixed["backbone.bn1"].num_batches_tracked) == 1
    assert adapter.optimizer.state  # the night update ran with a fresh optimizer
    adapter.step(frames["night"])
    night_state = _live(adapter)
    route = adapter.route(adapter.prepare(frames["dusk"]))  # what step() does first
    assert route is not None and route.key == 0 and not route.new
    assert adapter._switch(route) == "condition 0"
    assert _same(_live(adapter), dusk)  # exactly as it was left
    assert adapter.bank is not None and _same(adapter.bank.entries[1].state, night_state)
    assert adapter.step(frames["dusk"]).switched is None  # already served


@pytest.mark.parametrize(("fade", "beyond", "prior"), [(1.0, 0.5, 0.5), (2.0, 0.5, 0.75),
                                                   (1.0, 2.0, 0.0), (0.0, 0.5, 0.0)])  # fmt: skip
def test_the_source_prior_fades_with_the_conditions_distance_from_home(
    trained, fade, beyond, prior
):
    """λ is 1 at the home radius and falls linearly to 0 `prior_fade` radii further out; the
    runtime gets the statistics mixed with it (in the adapted layers: the last stages keep the
    source's, λ = 1)."""
    bundle, _ = trained
    adapter = _banked(bundle, prior_fade=fade)
    assert adapter.bank is not None and adapter.bank.home is not None
    dusk = adapter.prepare(_frames()["dusk"])
    adapter.bank.home_distance = distance(adapter.signature(dusk), adapter.bank.home) / (
        1 + beyond
    )  # the frame lies `beyond` radii past the home radius
    adapter.step(_frames()["dusk"])
    teacher = dict(adapter.teacher.named_buffers())
    adapted = [name for name, layer in adapter._mixed.items() if layer in adapter._adapted]
    assert adapted and len(adapted) < len(adapter._mixed)
    for name, layer in adapter._mixed.items():
        expected = prior if name in adapted else 1.0
        assert layer.prior == pytest.approx(expected, abs=1e-5)
        mixed = expected * layer.source_mean + (1 - expected) * layer.running_mean
        torch.testing.assert_close(teacher[f"{name}.running_mean"], mixed)


def test_a_shift_without_a_bank_restarts_the_test_average(trained):
    bundle, _ = trained
    adapter = adapter_for(bundle, bn_momentum=0.5)
    frames = _frames()
    adapter.step(frames["dusk"])
    adapter.step(frames["dusk"])
    stem = adapter.student.backbone
    first = adapter._mixed["backbone.bn1"]
    assert int(first.num_batches_tracked) == 2
    adapter.step(frames["night"], shifted=True)
    assert int(first.num_batches_tracked) == 1  # the night frame alone
    with torch.no_grad():
        night = stem.conv1(adapter.prepare(frames["night"]))
    torch.testing.assert_close(first.running_mean, night.mean(dim=(0, 2, 3)))


def test_without_a_bank_every_condition_shares_one_state(trained):
    bundle, _ = trained
    adapter = adapter_for(bundle)  # bank_size 0
    frames = _frames()
    reports = [adapter.step(frames[name]) for name in ("home", "dusk", "night")]
    assert [r.condition for r in reports] == ["all"] * 3
    assert all(r.switched is None and r.observation is not None for r in reports)
    assert adapter.counters.updates == 3


def test_the_least_recently_used_condition_gives_way():
    bank = ConditionBank(capacity=2, condition_distance=0.1)
    fresh = {"student": {"w": torch.zeros(2)}}
    a, b, c = (torch.full((4,), float(v)) for v in (1, 2, 3))
    assert bank.route(a, fresh).new and bank.route(b, fresh).new
    assert bank.route(a, fresh).key == 0  # a used after b: b is now the least recent
    route = bank.route(c, fresh)
    assert route.new and route.key == 2 and route.evicted == 1
    assert sorted(bank.entries) == [0, 2]
    assert bank.route(b, fresh).evicted == 0  # b is new again; a was least recent
    near = bank.route(c + 0.05, fresh)
    assert near.key == 2 and not near.new and near.distance == pytest.approx(0.05)


def test_no_home_without_a_calibrated_signature():
    bank = ConditionBank(capacity=2, home=None, home_distance=10.0)
    assert bank.route(torch.zeros(4), {"student": {}}).key == 0


def test_the_runtime_runs_the_bundles_weights_again_at_home(trained):
    bundle, _ = trained
    adapter = _banked(bundle, every=1)
    frames = _frames()
    with Segmenter.from_bundle(bundle, "onnxruntime", "cpu", "fp32", threads=1) as seg:
        source_out = seg(frames["dusk"])
        model, config = load_checkpoint(load_package(bundle, load_meta(bundle)).checkpoint)
        worker = AdaptWorker(adapter, make_sync(seg, model, config.input), inline=True)
        for i in range(3):
            worker.offer(frames["dusk"], source_out.presence, i)
        assert not np.allclose(seg(frames["dusk"]).presence, source_out.presence, atol=1e-4)
        worker.offer(frames["home"], source_out.presence, 3)
        events = worker.events()
        assert {"event": "switch", "frame": 3, "serving": HOME} in events
        assert events[-1]["event"] == "sync"
        np.testing.assert_allclose(seg(frames["dusk"]).presence, source_out.presence, atol=1e-5)
        assert worker.summary.home == 1 and worker.summary.adapted == 3
        assert worker.summary.switches == 2  # into condition 0, then home
        worker.close()


def _saved_after_dusk_and_night(bundle: Path, path: Path, **options) -> OnlineAdapter:
    """An adapter that saw dusk, then night twice (two bank entries, night live), saved to
    `path`."""
    adapter = _banked(bundle, **options)
    frames = _frames()
    for name in ("dusk", "night", "night"):
        adapter.step(frames[name])
    save_state(adapter, path)
    return adapter


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: a channels_last student
def test_the_bank_is_saved_and_resumed(trained, tmp_path, precision):
    bundle, _ = trained
    path = tmp_path / "state.pt"
    adapter = _saved_after_dusk_and_night(bundle, path, student_precision=precision)
    again = _banked(bundle, student_precision=precision)
    assert resume(again, path)
    assert again.active == 1 and again.bank is not None and sorted(again.bank.entries) == [0, 1]
    assert again.bank.clock == 3 and again.bank.next_key == 2
    for key, entry in adapter.bank.entries.items():
        assert _same(again.bank.entries[key].state, entry.state)
        assert torch.equal(again.bank.entries[key].signature, entry.signature)
    assert _same(_live(again), _live(adapter))
    switched = again.step(_frames()["dusk"]).switched
    assert switched == "condition 0"  # dusk's saved state, not a new entry


def test_a_state_adapted_in_every_layer_resumes_with_the_source_statistics_where_kept(
    trained, tmp_path
):
    """A state saved with every layer adapting (--adapt-source-stages 0, or before the kept
    stages existed) resumes under the default with the source statistics in the last two
    stages, live and in every bank entry; the early layers keep what they learned."""
    bundle, _ = trained
    path = tmp_path / "state.pt"
    adapter = _saved_after_dusk_and_night(bundle, path, source_stages=0)
    again = _banked(bundle)
    assert again.options.source_stages == 2 and resume(again, path)
    pairs = {"live": (_live(adapter), _live(again))}  # saved, resumed
    pairs |= {k: (e.state, again.bank.entries[k].state) for k, e in adapter.bank.entries.items()}
    kept = ("backbone.layer3.", "backbone.layer4.")
    statistics = ("running_mean", "running_var")
    held_adapted = set()
    for which, (before, after) in pairs.items():
        for role, tensors in after.items():
            for key, value in tensors.items():
                if not key.endswith(statistics):
                    continue
                if not key.startswith(kept):
                    assert torch.equal(value, before[role][key]), (which, role, key)
                    continue
                assert torch.equal(value, again.source_state[key]), (which, role, key)
                if not torch.equal(before[role][key], value):
                    held_adapted.add(which)
    # the live state (night) and dusk's entry, left at the switch to night, held adapted
    # statistics there (night's entry is written when night is left)
    assert held_adapted == {"live", 0}


def test_a_version_1_state_resumes_without_a_bank(trained, tmp_path):
    bundle, _ = trained
    adapter = _banked(bundle)
    adapter.step(_frames()["dusk"])
    state = adapter.state_dict()
    state["version"] = 1
    del state["bank"], state["active"]
    path = tmp_path / "v1.pt"
    torch.save(state, path)
    again = _banked(bundle)
    assert resume(again, path) and again.active is None
    assert again.bank is not None and not again.bank.entries
    assert again.step(_frames()["home"]).switched == HOME  # its live weights belong nowhere


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda b: b["entries"][0].update(signature=torch.zeros(3)), "bank.entries[0].signature"),
        (lambda b: b["entries"][0]["state"]["teacher"].popitem(), "bank.entries[0].state.teacher"),
        (lambda b: b.update(clock="soon"), "'bank'"),
    ],
)
def test_a_damaged_bank_names_its_field(trained, tmp_path, damage, field):
    bundle, _ = trained
    adapter = _banked(bundle)
    adapter.step(_frames()["dusk"])
    state = adapter.state_dict()
    damage(state["bank"])
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"bad\.pt: field .*" + re.escape(field)):
        load_state(path, _banked(bundle))
