"""The plateau tracker: patience, min_delta, cooldown, reductions, warmup, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp.plateau import PlateauTracker
from tests.configs import plateau_config


def run(tracker: PlateauTracker, values: list[float], start: int = 0) -> list:
    """Feed values for consecutive epochs; return (epoch, kind) of every event."""
    events = []
    for epoch, value in enumerate(values, start=start):
        event = tracker.update(epoch, value)
        if event is not None:
            events.append((epoch, event.kind))
    return events


def test_stops_after_patience_epochs_without_improvement():
    tracker = PlateauTracker(plateau_config(patience=3))
    assert run(tracker, [0.5, 0.6, 0.6, 0.59, 0.6, 0.7]) == [(4, "stop")]
    assert tracker.stopped
    assert tracker.best == 0.6 and tracker.best_epoch == 1
    assert tracker.plateau_start_epoch == 2
    assert "val/accuracy" in tracker.stop_reason and "epoch 1" in tracker.stop_reason


def test_no_update_after_stop():
    tracker = PlateauTracker(plateau_config(patience=1))
    run(tracker, [0.5, 0.4])
    assert tracker.update(2, 0.9) is None
    assert tracker.best == 0.5


def test_patience_zero_stops_on_first_bad_epoch():
    tracker = PlateauTracker(plateau_config(patience=0))
    assert run(tracker, [0.5, 0.6, 0.6]) == [(2, "stop")]


def test_improvement_resets_patience():
    tracker = PlateauTracker(plateau_config(patience=2))
    assert run(tracker, [0.5, 0.5, 0.6, 0.6, 0.7, 0.7]) == []
    assert tracker.bad_epochs == 1


def test_mode_min_watches_a_loss():
    tracker = PlateauTracker(plateau_config(monitor="val/loss", mode="min", patience=2))
    assert run(tracker, [1.0, 0.8, 0.9, 0.85]) == [(3, "stop")]
    assert tracker.best == 0.8


def test_min_delta_abs_ignores_small_gains():
    tracker = PlateauTracker(plateau_config(patience=2, min_delta=0.05))
    # +0.01 steps are below min_delta: not improvements.
    assert run(tracker, [0.5, 0.51, 0.52]) == [(2, "stop")]
    assert tracker.best == 0.5


def test_min_delta_rel_scales_with_best():
    cfg = plateau_config(
        monitor="val/loss", mode="min", patience=1, min_delta=0.1, min_delta_mode="rel"
    )
    tracker = PlateauTracker(cfg)
    # 100 -> 89 is an 11% gain (improves); 89 -> 81 is 9% (does not).
    assert run(tracker, [100.0, 89.0, 81.0]) == [(2, "stop")]
    assert tracker.best == 89.0


def test_nan_never_improves():
    tracker = PlateauTracker(plateau_config(patience=2))
    assert run(tracker, [0.5, math.nan, math.nan]) == [(2, "stop")]
    assert tracker.best == 0.5


def test_warmup_epochs_are_ignored():
    tracker = PlateauTracker(plateau_config(patience=1, warmup_epochs=3))
    # A high noisy value in warmup must not become the best.
    assert run(tracker, [0.9, 0.1, 0.1, 0.2, 0.3]) == []
    assert tracker.best == 0.3 and tracker.best_epoch == 4


def test_reduce_lr_then_stop_after_max_reductions():
    cfg = plateau_config(action="reduce_lr", patience=1, max_reductions=2, factor=0.5)
    tracker = PlateauTracker(cfg)
    events = run(tracker, [0.5, 0.4, 0.4, 0.4])
    assert events == [(1, "reduce_lr"), (2, "reduce_lr"), (3, "stop")]
    assert tracker.reductions == 2
    assert tracker.lr_scale == 0.25
    assert "after 2 LR reductions" in tracker.stop_reason


def test_reduce_lr_event_carries_factor_and_scale():
    tracker = PlateauTracker(
        plateau_config(action="reduce_lr", patience=1, factor=0.1, min_lr=1e-4)
    )
    tracker.update(0, 0.5)
    event = tracker.update(1, 0.5)
    assert event.kind == "reduce_lr" and event.factor == 0.1
    assert event.lr_scale == pytest.approx(0.1) and event.reductions == 1
    assert tracker.scaled_lr(1e-2) == pytest.approx(1e-3)
    assert tracker.scaled_lr(1e-4) == 1e-4  # floored at min_lr


def test_unlimited_reductions_never_stop():
    tracker = PlateauTracker(plateau_config(action="reduce_lr", patience=1, max_reductions=None))
    events = run(tracker, [0.5] + [0.4] * 20)
    assert [kind for _, kind in events] == ["reduce_lr"] * 20
    assert not tracker.stopped


def test_cooldown_skips_bad_epochs_after_reduction():
    cfg = plateau_config(action="reduce_lr", patience=1, cooldown=2, max_reductions=None)
    tracker = PlateauTracker(cfg)
    # Reduction at 1; epochs 2 and 3 are cooldown; next reduction at 4.
    assert run(tracker, [0.5, 0.4, 0.4, 0.4, 0.4]) == [(1, "reduce_lr"), (4, "reduce_lr")]


def test_action_none_only_reports():
    tracker = PlateauTracker(plateau_config(action="none", patience=2))
    events = run(tracker, [0.5, 0.4, 0.4, 0.4, 0.4])
    assert events == [(2, "plateau"), (4, "plateau")]
    assert not tracker.stopped


def test_alert_level_travels_with_the_event():
    def stop_event(config):
        tracker = PlateauTracker(config)
        tracker.update(0, 0.5)
        return tracker.update(1, 0.5)

    assert stop_event(plateau_config(patience=0, alert_level="ERROR")).alert_level == "ERROR"
    assert stop_event(plateau_config(patience=0, alert=False)).alert_level is None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"patience": -1}, "plateau.patience=-1"),
        ({"mode": "up"}, "plateau.mode='up'"),
        ({"min_delta": -0.1}, "plateau.min_delta=-0.1"),
        ({"min_delta_mode": "pct"}, "plateau.min_delta_mode"),
        ({"cooldown": -2}, "plateau.cooldown=-2"),
        ({"max_reductions": -1}, "plateau.max_reductions=-1"),
        ({"warmup_epochs": -1}, "plateau.warmup_epochs=-1"),
        ({"factor": 1.5}, "plateau.factor=1.5"),
        ({"min_lr": -1.0}, "plateau.min_lr=-1.0"),
        ({"action": "halt"}, "plateau.action='halt'"),
        ({"alert_level": "LOUD"}, "plateau.alert_level='LOUD'"),
        ({"monitor": ""}, "plateau.monitor"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        plateau_config(**kwargs)


def test_state_dict_loads_with_weights_only():
    tracker = PlateauTracker(plateau_config(action="reduce_lr", patience=1))
    run(tracker, [0.5, 0.4, math.nan])
    buffer = io.BytesIO()
    torch.save({"plateau": tracker.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["plateau"]
    restored = PlateauTracker(plateau_config(action="reduce_lr", patience=1))
    restored.load_state_dict(state)
    assert restored.state_dict() == tracker.state_dict()


def test_state_from_another_metric_is_rejected():
    state = PlateauTracker(plateau_config(monitor="val/loss", mode="min")).state_dict()
    with pytest.raises(ValueError, match="plateau.monitor"):
        PlateauTracker(plateau_config()).load_state_dict(state)


configs = st.builds(
    plateau_config,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.01, 0.1]),
    min_delta_mode=st.sampled_from(["abs", "rel"]),
    cooldown=st.integers(0, 2),
    max_reductions=st.one_of(st.none(), st.integers(0, 3)),
    warmup_epochs=st.integers(0, 3),
    action=st.sampled_from(["stop", "reduce_lr", "none"]),
)
values = st.lists(
    st.one_of(st.floats(-2, 2, allow_nan=False), st.just(math.nan), st.just(0.5)),
    min_size=0,
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(config=configs, history=values, cut=st.integers(0, 25))
def test_resume_mid_run_gives_the_same_decisions(config, history, cut):
    cut = min(cut, len(history))
    straight = PlateauTracker(config)
    expected = run(straight, history)

    first = PlateauTracker(config)
    before = run(first, history[:cut])
    resumed = PlateauTracker(config)
    resumed.load_state_dict(first.state_dict())
    after = run(resumed, history[cut:], start=cut)

    assert before + after == expected
    assert resumed.state_dict() == straight.state_dict()
