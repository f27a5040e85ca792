from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from distml.data.ingest import ingest
from distml.data.tensors import SplitTensors
from distml.distributed.checkpoint import checkpoint_paths
from distml.rundir import RunDir
from distml.training.best import BestSoFar
from distml.training.callbacks import Callback
from distml.training.candidate import train_candidate
from distml.training.trainer import TrainState
from tests.helpers.configs import make_config


class Crash(Callback):
    """Simulates a dead process: raises after a given optimizer step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, trainer, record):
        if record["step"] == self.at_step:
            raise RuntimeError("simulated crash")


def _train(tmp_path, raw, out, *, overrides=(), callbacks=(), resume=False):
    cfg = make_config(raw, overrides=list(overrides))
    manifest = ingest(cfg.data, tmp_path / "data", seed=cfg.seed)
    result = train_candidate(
        cfg, cfg.train.candidates[0], manifest,
        val=SplitTensors.load(manifest, "val"),
        run=RunDir(tmp_path / out), resume=resume, callbacks=callbacks,
    )
    folder = RunDir(tmp_path / out).candidate(cfg.train.candidates[0].name)
    return result, load_file(folder.artifact / "model.safetensors")


def _checkpoints(tmp_path, raw, out):
    name = make_config(raw).train.candidates[0].name
    return checkpoint_paths(RunDir(tmp_path / out).candidate(name).checkpoints)


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture
def dropout_raw(tiny_raw):
    # Dropout makes the global RNG matter, so resume must restore it too.
    tiny_raw["train"]["candidates"][0]["model"] = {"type": "mlp", "hidden_sizes": [32],
                                                   "dropout": 0.2}
    return tiny_raw


def test_same_config_gives_bit_identical_weights(tmp_path, dropout_raw):
    r1, w1 = _train(tmp_path, dropout_raw, "a")
    r2, w2 = _train(tmp_path, dropout_raw, "b")
    _assert_identical(w1, w2)
    assert r1["history"]["train_loss"] == r2["history"]["train_loss"]
    _, w3 = _train(tmp_path, dropout_raw, "c", overrides=["seed=1"])
    assert not torch.equal(w1["0.weight"], w3["0.weight"])


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, dropout_raw):
    overrides = ["train.checkpoint_every_steps=5", "train.restore_best=false"]
    full, w_full = _train(tmp_path, dropout_raw, "full", overrides=overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, dropout_raw, "crashed", overrides=overrides, callbacks=[Crash(13)])
    # The crash came mid-epoch (20 steps per epoch), after the step-10 checkpoint.
    assert [p.name for p in _checkpoints(tmp_path, dropout_raw, "crashed")] == [
        "step-00000005", "step-00000010"]
    resumed, w_resumed = _train(tmp_path, dropout_raw, "crashed", overrides=overrides,
                                resume=True)
    _assert_identical(w_full, w_resumed)
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    assert resumed["steps"] == full["steps"] == 40


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_raw):
    # 1257 rows: the last step of each epoch is short (41 rows), where the naive
    # "loss / accum_steps" scaling would weight its micro-batches wrongly.
    _, big = _train(tmp_path, tiny_raw, "big", overrides=["train.epochs=1"])
    _, acc = _train(tmp_path, tiny_raw, "acc",
                    overrides=["train.epochs=1", "train.grad_accum_steps=4"])
    for k in big:
        torch.testing.assert_close(big[k], acc[k], rtol=1e-5, atol=1e-6)


def test_early_stopping_stops_when_val_does_not_improve(tmp_path, tiny_raw):
    result, _ = _train(tmp_path, tiny_raw, "es", overrides=[
        "train.lr=1e-12", "train.eval_every_steps=2", "train.early_stopping_patience=2",
        "train.warmup_steps=0", "train.epochs=5"])
    assert result["steps"] == 6  # evals at 2 (best), 4 and 6 (no improvement) -> stop
    assert result["best_step"] == 2


def test_bf16_autocast_trains(tmp_path, tiny_raw):
    result, _ = _train(tmp_path, tiny_raw, "bf16",
                       overrides=["train.precision=bf16", "train.epochs=3"])
    losses = result["history"]["train_loss"]
    assert losses[-1] < losses[0] * 0.5


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_raw, caplog):
    overrides = ["train.checkpoint_every_steps=10", "train.keep_checkpoints=3",
                 "train.restore_best=false"]
    full, w_full = _train(tmp_path, tiny_raw, "ck", overrides=overrides)
    paths = _checkpoints(tmp_path, tiny_raw, "ck")
    assert [p.name for p in paths] == ["step-00000020", "step-00000030", "step-00000040"]
    for shard in paths[-1].glob("*.distcp"):
        shard.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.INFO):
        resumed, w_resumed = _train(tmp_path, tiny_raw, "ck", overrides=overrides, resume=True)
    assert "step-00000040 cannot be loaded" in caplog.text
    assert "resumed from" in caplog.text
    assert "step-00000030 (step 30)" in caplog.text
    _assert_identical(w_full, w_resumed)  # steps 31-40 replayed exactly
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]


@pytest.mark.parametrize(("metric", "values", "best_step", "stops_at"), [
    ("accuracy", [0.5, 0.7, 0.7, 0.6], 2, 4),  # a tie is no improvement
    ("loss", [1.0, 0.8, 0.9, 0.8], 2, 4),
    ("loss", [1.0, 0.8, 0.7, 0.9], 3, None),
])
def test_best_so_far_keeps_the_weights_selection_would_pick(metric, values, best_step, stops_at):
    best, state, stopped = BestSoFar(metric, patience=2), TrainState(), None
    for step, value in enumerate(values, start=1):
        if best.observe(state, value, step=step, weights=lambda s=step: {"w": torch.tensor(s)}):
            stopped = step
            break
    assert (state.best_step, int(best.weights["w"]), stopped) == (best_step, best_step, stops_at)
    assert state.best_value == values[best_step - 1]
