"""Distillation's parts: the loss against its closed form, the config's teachers, and the
teachers' stored outputs meeting their own rows under shuffling and sharding."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from distml.artifact import load_artifact, save_artifact
from distml.config import DataConfig, ExecutionConfig, LoaderConfig
from distml.data.dataset import read_partition
from distml.data.ingest import ingest
from distml.data.loader import PartitionLoader
from distml.data.teacher_logits import aligned_logits, read_row_ids, write_logits
from distml.errors import ConfigError, DataError
from distml.models import build_model
from distml.training.distill import (
    UNLABELLED,
    Distiller,
    Ensemble,
    calibration_scale,
    kd_loss,
    pack,
    unpack,
)
from distml.workflow.distill import Teacher, check_fits, student_splits, teacher_logits
from tests.helpers.configs import make_config


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _closed_form(s, t, y, temperature, alpha):
    """L = (1 - a) CE(y, s) + a T^2 KL(p_t || p_s), in float64 numpy: the KL summed over
    classes and averaged over samples."""
    s, t, y = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    ce = -np.log(_softmax(s)[np.arange(len(y)), y]).mean()
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@pytest.mark.parametrize("shape", [(32, 10), (4, 7, 256)], ids=["classes", "tokens"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_loss_equals_its_closed_form(shape, temperature, alpha):
    g = torch.Generator().manual_seed(int(temperature * 10 + alpha * 100))
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    got = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
    want = _closed_form(s.numpy(), t.numpy(), y.numpy(), temperature, alpha)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_the_soft_term_is_scaled_by_t_squared_and_averaged_per_sample():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.zeros(16, dtype=torch.long)
    kl = {temp: float(kd_loss(s, t, y, temperature=temp, alpha=1.0)) / temp**2
          for temp in (2.0, 5.0)}
    for temp, value in kl.items():  # batchmean: sum over classes, mean over the 16 rows
        p_t = F.softmax(t / temp, -1)
        per_row = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1)
        assert value == pytest.approx(float(per_row.mean()), rel=1e-5)
        assert value != pytest.approx(float(per_row.mean()) / 10, rel=1e-2)  # not "mean"


def test_alpha_zero_is_cross_entropy_exactly():
    s = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    a = kd_loss(s, torch.randn(8, 5), y, temperature=4.0, alpha=0.0)
    (ga,) = torch.autograd.grad(a, s)
    b = F.cross_entropy(s, y)
    (gb,) = torch.autograd.grad(b, s)
    assert torch.equal(a, b)
    assert torch.equal(ga, gb)


def test_targets_pack_labels_and_logits_and_unpack_them():
    y = torch.tensor([[3, 0], [255, 7]])
    logits = torch.randn(2, 2, 256)
    labels, back = unpack(pack(y, logits))
    assert torch.equal(labels, y)
    assert torch.equal(back, logits)


def test_an_ensemble_averages_its_members_logits():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(Ensemble([a, b])(x), (a(x) + b(x)) / 2)


def test_online_teacher_packs_its_logits_and_the_loss_can_backpropagate():
    teacher = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    student = torch.nn.Sequential(torch.nn.Embedding(256, 4), torch.nn.Linear(4, 256))
    d = Distiller(2.0, 0.5, teacher=teacher.eval())
    x = torch.randint(0, 256, (3, 6))
    y = torch.randint(0, 256, (3, 6))
    x2, targets = d.attach((x, y))
    assert targets.shape == (3, 6, 257)
    torch.testing.assert_close(targets[..., 1:], teacher(x))
    d.loss(student(x2), targets).backward()  # inference-mode outputs must not leak in
    grad = student[0].weight.grad
    assert torch.isfinite(grad).all()
    assert grad[x.unique()].abs().sum() > 0
    assert teacher[0].weight.grad is None  # the teacher is not trained by the student's loss


def test_unlabelled_rows_take_the_soft_term_alone():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([3, UNLABELLED, 1, UNLABELLED, UNLABELLED, 0])
    got = kd_loss(s, t, y, temperature=2.0, alpha=0.3, masked=True)
    labelled = y != UNLABELLED
    ce = F.cross_entropy(s[labelled], y[labelled])
    soft = kd_loss(s, t, y.clamp(min=0), temperature=2.0, alpha=1.0)  # over all six rows
    torch.testing.assert_close(got, 0.7 * ce + 0.3 * soft)
    none = torch.full((6,), UNLABELLED)  # a batch of transfer rows only: no hard term
    torch.testing.assert_close(kd_loss(s, t, none, temperature=2.0, alpha=0.3, masked=True),
                               0.3 * soft)


def test_jittered_copies_join_the_batch_labelled_by_the_teacher_alone():
    teacher = torch.nn.Linear(4, 3)
    d = Distiller(2.0, 0.5, teacher=teacher.eval(), masked=True, copies=2, noise=0.5,
                  generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(5, 4), torch.arange(5) % 3
    x2, targets = d.attach((x, y))
    labels, logits = unpack(targets)
    assert x2.shape == (15, 4)
    torch.testing.assert_close(x2[:5], x)
    assert 0.3 < (x2[5:] - x.repeat(2, 1)).std() < 0.7  # the noise named
    assert labels.tolist() == y.tolist() + [UNLABELLED] * 10
    torch.testing.assert_close(logits, teacher(x2))


def test_calibration_undoes_an_over_confident_teachers_scale():
    torch.manual_seed(0)
    honest = torch.randn(4000, 4)  # logits whose softmax is the labels' distribution
    labels = torch.distributions.Categorical(logits=honest).sample()
    assert calibration_scale(honest, labels) == pytest.approx(1.0, abs=0.1)
    assert calibration_scale(6 * honest, labels) == pytest.approx(6.0, rel=0.1)


# -- config ---------------------------------------------------------------------------------


def _with_distill(raw, distill, index=1):
    raw["train"]["candidates"][index]["distill"] = distill
    return raw


@pytest.mark.parametrize(("distill", "match"), [
    ({"teacher": "nope"}, r"  train\.candidates\[1\]\.distill\.teacher = 'nope': names no "
                          r"candidate of this run \(candidates: small, cnn\); .* "
                          r"nope@production or nope:1"),
    ({"teacher": "cnn"}, r"train\.candidates\[1\]\.distill\.teacher = 'cnn': is the "
                         r"candidate itself"),
    ({"teacher": []}, r"distill\.teacher = \[\]: .*an empty list names no teacher"),
    ({"teacher": ["small", "small"]}, r"'small' is listed twice"),
    ({"teacher": "a b"}, r"'a b' is not a teacher reference; use a candidate name, .*"
                         r"name@alias or name:version"),
    ({"teacher": "m:latest"}, r"'m:latest' is not a teacher reference"),
    ({"teacher": "small", "alpha": 1.5}, r"distill\.alpha = 1\.5: .*less than or equal to 1"),
    ({"teacher": "small", "temperature": 0}, r"distill\.temperature = 0: .*greater than 0"),
    ({"teacher": "small", "beta": 1}, r"distill\.beta = 1: unknown key"),
    ({"teacher": "small", "transfer": {"copies": -1}},
     r"distill\.transfer\.copies = -1: .*greater than or equal to 0"),
    ({"teacher": "small", "transfer": {"noise": "inf"}},
     r"distill\.transfer\.noise = 'inf': .*not a finite number"),
])
def test_bad_teachers_are_refused_naming_key_value_and_fix(tiny_raw, distill, match):
    with pytest.raises(ConfigError, match=match):
        make_config(_with_distill(tiny_raw, distill))


def test_a_cycle_of_teachers_is_refused(tiny_raw):
    _with_distill(tiny_raw, {"teacher": "small"})
    _with_distill(tiny_raw, {"teacher": "cnn"}, index=0)
    with pytest.raises(ConfigError, match=r"train\.candidates\[0\]\.distill\.teacher: small "
                                          r"-> cnn -> small teach each other in a cycle.*"
                                          r"remove one of these teachers"):
        make_config(tiny_raw)


def test_regression_cannot_be_distilled(tiny_raw):
    tiny_raw["data"] = {"source": {"type": "synthetic:regression", "n_samples": 200}}
    with pytest.raises(ConfigError, match=r"train\.candidates\[1\]\.distill: .*regression "
                                          r"model has none; remove distill"):
        make_config(_with_distill(tiny_raw, {"teacher": "small"}))


def test_teachers_train_before_their_students(tiny_raw):
    tiny_raw["train"]["candidates"] = [
        {"name": "s", "model": {"type": "mlp"}, "distill": {"teacher": ["t1", "reg@prod"]}},
        {"name": "t1", "model": {"type": "mlp"}, "distill": {"teacher": "t2"}},
        {"name": "other", "model": {"type": "mlp"}},
        {"name": "t2", "model": {"type": "mlp"}},
    ]
    cfg = make_config(tiny_raw)
    assert [c.name for c in cfg.train.training_order()] == ["t2", "t1", "s", "other"]
    assert [c.name for c in cfg.train.training_order("s")] == ["t2", "t1", "s"]
    assert [c.name for c in cfg.train.training_order("t2")] == ["t2"]
    s = cfg.train.candidates[0]
    assert s.distill.teachers == ["t1", "reg@prod"]
    assert s.distill.registered_teachers() == ["reg@prod"]
    assert (s.distill.temperature, s.distill.alpha) == (2.0, 0.5)
    assert "distill" not in s.overrides()  # not a training setting
    assert make_config(cfg.to_dict()) == cfg  # the resolved config loads back


# -- teachers' outputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic classification in several partitions, and a teacher artifact for it."""
    root = tmp_path_factory.mktemp("distill")
    cfg = DataConfig.model_validate({
        "source": {"type": "synthetic:classification", "n_samples": 900, "n_features": 5,
                   "n_classes": 3}, "rows_per_partition": 200})
    manifest = ingest(cfg, root / "data", seed=0)
    torch.manual_seed(0)
    spec = {"type": "mlp", "kwargs": {"in_features": 5, "num_outputs": 3, "hidden_sizes": [8]}}
    teacher = save_artifact(build_model(spec), {
        "task": "classification", "model": spec, "labels": manifest.classes,
        "feature_names": manifest.feature_names, "preprocessing": manifest.preprocessing,
    }, root / "teacher")
    return manifest, teacher


def test_teacher_outputs_meet_their_rows_under_shuffle_and_sharding(data):
    manifest, artifact = data
    assert len(manifest.partitions("train")) > 2
    store = teacher_logits(manifest, [Teacher("t", "t", None, str(artifact))],
                           ExecutionConfig(num_workers=2))
    model = load_artifact(artifact).model
    seen = 0
    for rank in range(2):
        loader = PartitionLoader(manifest, "train", batch_size=16, seed=1, rank=rank,
                                 world_size=2, teacher_logits=store,
                                 config=LoaderConfig(shuffle_window=64))
        for x, targets in loader.batches(epoch=1):
            labels, logits = unpack(targets)
            with torch.no_grad():
                torch.testing.assert_close(logits, model(x))  # this row's teacher output
            seen += len(x)
    assert seen == 2 * (manifest.rows("train") // 2)  # every row (the odd one dropped)
    # the same rows and labels, in the same order, as a plain loader's
    plain = PartitionLoader(manifest, "train", batch_size=16, seed=1,
                            config=LoaderConfig(shuffle_window=64))
    packed = PartitionLoader(manifest, "train", batch_size=16, seed=1, teacher_logits=store,
                             config=LoaderConfig(shuffle_window=64))
    for (xa, ya), (xb, tb) in zip(plain.batches(0), packed.batches(0), strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, unpack(tb)[0])


def test_stored_outputs_are_matched_by_row_id_not_position(data, tmp_path):
    manifest, _ = data
    rel = manifest.partitions("train")[0]["path"]
    ids = read_row_ids(manifest, rel)
    logits = np.stack([ids, -ids], axis=1).astype(np.float32)  # each row's id, recognisable
    reverse = np.arange(len(ids))[::-1]
    write_logits(tmp_path, rel, ids[reverse], logits[reverse])
    np.testing.assert_array_equal(aligned_logits(tmp_path, rel, ids), logits)
    write_logits(tmp_path, rel, ids[1:], logits[1:])
    with pytest.raises(DataError, match=r"lack 1 of the partition's .* rows .*delete"):
        aligned_logits(tmp_path, rel, ids)
    x, _ = read_partition(manifest, rel)
    assert len(x) == len(ids) == pq.read_metadata(manifest.root / rel).num_rows


def test_a_teacher_must_fit_the_task_classes_and_inputs(data):
    manifest, artifact = data
    spec = load_artifact(artifact).spec
    check_fits(spec, manifest, "t")
    with pytest.raises(ConfigError, match=r"t is a language_modeling model, but this run's "
                                          r"data is a classification task"):
        check_fits({**spec, "task": "language_modeling"}, manifest, "t")
    with pytest.raises(ConfigError, match=r"predicts the classes \['a', 'b'\]"):
        check_fits({**spec, "labels": ["a", "b"]}, manifest, "t")
    with pytest.raises(ConfigError, match=r"differently prepared inputs"):
        check_fits({**spec, "feature_names": ["z"]}, manifest, "t")


def test_a_transfer_set_with_nothing_to_read_is_refused(data, tiny_raw):
    manifest, _ = data  # no unlabelled split
    tiny_raw["train"]["candidates"][0]["distill"] = {"teacher": "cnn",
                                                     "transfer": {"labelled": False}}
    cfg = make_config(tiny_raw)
    with pytest.raises(ConfigError, match=r"train\.candidates\[0\]\.distill\.transfer\."
                                          r"labelled=false, and the data has no unlabelled "
                                          r"rows \(data\.split\.unlabelled=0\.0\).*set "
                                          r"data\.split\.unlabelled"):
        student_splits(cfg, cfg.train.candidates[0], manifest)
    tiny_raw["train"]["candidates"][0]["distill"]["transfer"]["labelled"] = True
    cfg = make_config(tiny_raw)
    assert student_splits(cfg, cfg.train.candidates[0], manifest) == ["train"]
