from __future__ import annotations

import pytest
import torch

from distml.config import ClickSpec, CNNSpec, CustomModelSpec, MLPSpec, TransformerSpec
from distml.errors import ConfigError
from distml.models import build_model, check_fits, resolve_spec


def _build(spec, **kw):
    defaults = {"task": "classification", "num_features": 64, "num_outputs": 10, "where": "m"}
    return build_model(resolve_spec(spec, **{**defaults, **kw}))


def test_mlp_and_cnn_map_features_to_classes():
    x = torch.randn(5, 64)
    mlp = _build(MLPSpec(type="mlp", hidden_sizes=[32, 16], dropout=0.1))
    cnn = _build(CNNSpec(type="cnn"))
    assert mlp(x).shape == (5, 10)
    assert cnn(x).shape == (5, 10)


def test_cnn_takes_explicit_image_shape():
    cnn = _build(CNNSpec(type="cnn", image_shape=(3, 4, 5)), num_features=60)
    assert cnn(torch.randn(2, 60)).shape == (2, 10)


def test_transformer_is_causal():
    spec = TransformerSpec(type="transformer", num_layers=2, num_heads=2, dim=32)
    model = _build(spec, task="language_modeling", num_features=16, num_outputs=256).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the past ignores the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.generate(tokens[:, :4], 5).shape == (2, 9)


@pytest.mark.parametrize(
    ("spec", "kw", "match"),
    [
        (CNNSpec(type="cnn"), {"num_features": 10},
         r"m: the cnn needs image-shaped inputs; 10 features are not a square image"),
        (CNNSpec(type="cnn", image_shape=(1, 28, 28)), {},
         r"m\.image_shape=\[1, 28, 28\] holds 1\*28\*28=784 values but the data has 64"),
        (TransformerSpec(type="transformer"), {},
         r"m: the transformer is a language model over text tokens, but the data is a "
         r"classification table"),
        (MLPSpec(type="mlp"), {"task": "language_modeling"},
         r"m: a mlp takes numeric features, but the data is text tokens; use type: transformer"),
        (TransformerSpec(type="transformer", context_length=8),
         {"task": "language_modeling", "num_features": 16},
         r"m\.context_length=8 is shorter than the data's sequence_length=16"),
    ],
)
def test_specs_that_do_not_fit_the_data_are_refused(spec, kw, match):
    with pytest.raises(ConfigError, match=match):
        _build(spec, **kw)


def test_user_factory_gets_only_the_arguments_it_accepts(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build(*, in_features, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(in_features, width),\n"
        "                               torch.nn.Linear(width, 3))\n"
        "def not_a_model(**kw):\n"
        "    return 42\n"
    )
    spec = CustomModelSpec(type=f"{tmp_path / 'net.py'}:build", kwargs={"width": 4})
    model = _build(spec, num_outputs=3, num_features=7)
    assert model[0].weight.shape == (4, 7)
    with pytest.raises(ConfigError, match=r"returned int, not nn\.Module"):
        _build(CustomModelSpec(type=f"{tmp_path / 'net.py'}:not_a_model"))
    with pytest.raises(ConfigError, match=r"cannot be loaded: .*no_such_module"):
        _build(CustomModelSpec(type="no_such_module:build"))


def test_check_fits_reports_a_wrong_output_shape():
    model = torch.nn.Linear(64, 3)
    with pytest.raises(ConfigError, match=r"returned \(2, 3\) .*expected \(batch, 10\)"):
        check_fits(model, torch.randn(2, 64), (10,), "m")
    with pytest.raises(ConfigError, match=r"forward pass on inputs of shape \(2, 5\) failed"):
        check_fits(model, torch.randn(2, 5), (3,), "m")


def test_the_zoo_click_model_takes_a_dense_optimizer_and_gradient_clipping():
    spec = ClickSpec(type="click", cardinalities=[100, 7], dim=4, hidden_sizes=[8])
    model = build_model(spec.resolve(task="classification", num_features=5, num_outputs=2,
                                     where="model"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.tensor([[0.1, 0.2, 0.3, 42.0, 6.0], [0.0, 1.0, 0.0, 99.0, 0.0]])
    model(x).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # sparse gradients would raise
    opt.step()
    assert model.num_dense == 3
