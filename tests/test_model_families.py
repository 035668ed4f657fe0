"""HtFL model families: the eight architectures, the feature projection, the registry's projection argument."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.families import FAMILIES, architecture_of, get_family, register_family
from fedpal.models.projection import FlatAdaptiveAvgPool, feature_projection
from fedpal.models.registry import MODELS, build_model

IMAGE = ("img_mlp", "img_cnn4", "img_cnn_deep", "img_resnet", "img_dsconv")
HAR = ("har_cnn1d", "har_resnet1d", "har_gru")
IMAGE_SHAPES = ((1, 28, 28), (1, 8, 8), (3, 32, 32))
HAR_SHAPES = ((6, 128), (9, 128))
CASES = [(name, shape) for name in IMAGE for shape in IMAGE_SHAPES] + [
    (name, shape) for name in HAR for shape in HAR_SHAPES
]
# Every architecture stays below this many parameters on 1x28x28 / (6, 128) with D = 64 and 10 classes, in both
# projection modes (the largest is img_cnn_deep with "linear": about 131k; img_mlp on 3x32x32 is larger).
PARAM_LIMIT = 300_000


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def projection_of(model: SplitModel) -> nn.Module:
    """The new architectures build backbone = Sequential(trunk, projection)."""
    assert isinstance(model.backbone, nn.Sequential) and len(model.backbone) == 2
    return model.backbone[1]


@pytest.mark.parametrize(("name", "shape"), CASES)
@pytest.mark.parametrize("feature_dim", [32, 64])
@pytest.mark.parametrize("projection", ["pool", "linear"])
def test_architectures_map_inputs_to_logits_through_a_d_dim_feature(
    name: str, shape: tuple[int, ...], feature_dim: int, projection: str
) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7, feature_dim=feature_dim, hidden_dim=0, projection=projection)
    assert isinstance(model, SplitModel)
    x = torch.randn(4, *shape)
    logits = model(x)
    features = model.features(x)
    assert logits.shape == (4, 7)
    assert features.shape == (4, feature_dim)
    assert torch.allclose(model.head(features), logits)
    assert torch.isfinite(logits).all()
    # no batch norm: no buffers, and train / eval modes compute the same thing
    assert list(model.named_buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.eval()
    assert torch.equal(model(x), logits)


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_pool_projection_is_parameter_free_and_non_negative(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    model = build_model(name, shape, 10, 64, 0, projection="pool")
    projection = projection_of(model)
    assert any(isinstance(m, FlatAdaptiveAvgPool) for m in projection.modules())
    assert n_params(projection) == 0
    assert not any(isinstance(m, nn.Linear) for m in projection.modules())
    features = model.features(torch.randn(8, *shape))
    assert (features >= 0).all()
    assert features.abs().sum() > 0  # not all dead


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_linear_projection_is_a_linear_layer_and_relu(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    pooled = build_model(name, shape, 10, 32, 0, projection="pool")
    model = build_model(name, shape, 10, 32, 0, projection="linear")
    projection = projection_of(model)
    assert isinstance(projection[0], nn.Linear) and isinstance(projection[1], nn.ReLU)
    linear = projection[0]
    assert linear.out_features == 32
    # the trunk is the same in both modes; "linear" adds exactly one Linear(flat, D)
    assert n_params(model) - n_params(pooled) == linear.in_features * 32 + 32
    assert (model.features(torch.randn(8, *shape)) >= 0).all()


@pytest.mark.parametrize("name", IMAGE + HAR)
@pytest.mark.parametrize("projection", ["pool", "linear"])
def test_architectures_stay_small(name: str, projection: str) -> None:
    shape = (6, 128) if name in HAR else (1, 28, 28)
    assert n_params(build_model(name, shape, 10, 64, 0, projection=projection)) < PARAM_LIMIT


@pytest.mark.parametrize("name", IMAGE)
def test_each_image_architecture_fits_a_tiny_batch(name: str) -> None:
    """64 fixed random images with random labels: a few optimiser steps must get well below the label-prior loss.

    Predicting only the label frequencies (what a model with a dead backbone can still learn through the head's
    bias) reaches the entropy of the labels, about 2.2 nats here; passing the test needs the backbone to carry
    per-image information to the head.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    frequencies = torch.bincount(y, minlength=10).float() / len(y)
    prior = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum().item()
    model = build_model(name, (1, 28, 28), 10, 64, 0, projection="linear")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x)
        end = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    assert start > 0.9 * math.log(10)
    assert end < 0.5 * prior
    assert accuracy >= 0.75


def test_feature_projection_pool_averages_contiguous_slices() -> None:
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    pool = feature_projection(8, 4, "pool")
    assert torch.equal(pool(x), torch.tensor([[0.5, 2.5, 4.5, 6.5]]))
    # in_dim < feature_dim: values repeat (documented, allowed)
    assert torch.equal(
        feature_projection(2, 4, "pool")(torch.tensor([[1.0, 3.0]])), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    )
    assert n_params(pool) == 0


def test_feature_projection_linear_is_linear_then_relu() -> None:
    projection = feature_projection(10, 3, "linear")
    assert [type(m) for m in projection] == [nn.Linear, nn.ReLU]
    assert (projection[0].in_features, projection[0].out_features) == (10, 3)


def test_unknown_projection_is_a_one_line_user_error_listing_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown feature projection 'avg'.*pool, linear") as caught:
        feature_projection(10, 3, "avg")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="unknown feature projection 'avg'"):
        build_model("img_cnn4", (1, 28, 28), 10, 64, 0, projection="avg")
    with pytest.raises(UserError, match="unknown feature projection 'avg'"):
        build_model("mlp", (1, 8, 8), 10, 16, 16, projection="avg")


@pytest.mark.parametrize(
    ("name", "shape"),
    [(name, (6, 128)) for name in IMAGE] + [(name, (1, 28, 28)) for name in HAR] + [("img_mlp", (784,))],
)
def test_wrong_input_rank_is_a_one_line_user_error(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match=f"model '{name}' needs") as caught:
        build_model(name, shape, 10, 64, 0)
    assert "\n" not in str(caught.value)


# --- the three original models: "linear" (the default) must be exactly what it was -------------------------

# state_dict keys and parameter counts (10 classes, D = 64, hidden 200) recorded before the projection argument
OLD_MODELS = [
    ("mlp", (1, 28, 28), 170_514, ["backbone.1", "backbone.3", "head"]),
    ("mlp", (1, 8, 8), 26_514, ["backbone.1", "backbone.3", "head"]),
    ("cnn", (1, 28, 28), 118_346, ["backbone.0.0", "backbone.0.3", "backbone.1", "head"]),
    ("cnn", (1, 8, 8), 69_194, ["backbone.0.0", "backbone.0.3", "backbone.1", "head"]),
    ("cnn", (3, 32, 32), 156_810, ["backbone.0.0", "backbone.0.3", "backbone.1", "head"]),
    ("har_cnn", (6, 128), 48_970, ["backbone.0", "backbone.3", "backbone.6", "backbone.10", "head"]),
    ("har_cnn", (9, 128), 49_450, ["backbone.0", "backbone.3", "backbone.6", "backbone.10", "head"]),
]


@pytest.mark.parametrize(("name", "shape", "count", "layers"), OLD_MODELS)
def test_original_models_keep_their_parameters_in_linear_mode(
    name: str, shape: tuple[int, ...], count: int, layers: list[str]
) -> None:
    keys = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    for model in (
        build_model(name, shape, 10, 64, 200),
        build_model(name, shape, 10, 64, 200, projection="linear"),
        MODELS[name][0](shape, 10, 64, 200),
    ):
        assert list(model.state_dict()) == keys
        assert n_params(model) == count


@pytest.mark.parametrize(("name", "shape"), [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("har_cnn", (6, 128))])
def test_original_models_accept_the_pool_projection(name: str, shape: tuple[int, ...]) -> None:
    linear = build_model(name, shape, 10, 16, 32, projection="linear")
    pooled = build_model(name, shape, 10, 16, 32, projection="pool")
    last_dense = [m for m in linear.backbone.modules() if isinstance(m, nn.Linear)][-1]
    assert n_params(linear) - n_params(pooled) == last_dense.in_features * 16 + 16
    features = pooled.features(torch.randn(3, *shape))
    assert features.shape == (3, 16) and (features >= 0).all()


def test_a_four_argument_builder_still_works_but_only_with_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    def build_old(shape, num_classes, feature_dim, hidden_dim):
        return SplitModel(
            nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), feature_dim)), feature_dim, num_classes
        )

    monkeypatch.setitem(MODELS, "test_old", (build_old, "a four-argument builder"))
    assert build_model("test_old", (1, 8, 8), 10, 5, 0).feature_dim == 5
    with pytest.raises(UserError, match="model 'test_old' takes no feature projection"):
        build_model("test_old", (1, 8, 8), 10, 5, 0, projection="pool")


# --- families ---------------------------------------------------------------------------------------------------


def test_builtin_families() -> None:
    assert get_family("image5") == IMAGE
    assert get_family("har3") == HAR
    for architectures, description in FAMILIES.values():
        assert architectures and description
        assert all(arch in MODELS for arch in architectures)


@pytest.mark.parametrize("family", ["image5", "har3"])
def test_clients_take_architectures_round_robin(family: str) -> None:
    architectures = get_family(family)
    k = len(architectures)
    assert [architecture_of(i, architectures) for i in range(3 * k)] == list(architectures) * 3
    assert architecture_of(20, architectures) == architectures[20 % k]


def test_architecture_of_examples() -> None:
    assert architecture_of(0, IMAGE) == "img_mlp"
    assert architecture_of(4, IMAGE) == "img_dsconv"
    assert architecture_of(5, IMAGE) == "img_mlp"
    assert architecture_of(7, HAR) == "har_resnet1d"
    with pytest.raises(ValueError):
        architecture_of(-1, IMAGE)
    with pytest.raises(ValueError):
        architecture_of(0, ())


@pytest.mark.parametrize(("family", "shape"), [("image5", (1, 28, 28)), ("har3", (6, 128))])
def test_family_members_share_the_feature_size(family: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(2, *shape)
    for arch in get_family(family):
        model = build_model(arch, shape, 10, 64, 0, projection="pool")
        assert model.features(x).shape == (2, 64)
        assert model.head.in_features == 64


def test_unknown_family_is_a_user_error_with_a_hint() -> None:
    with pytest.raises(UserError, match=r"unknown model family 'imag5'.*did you mean 'image5'") as caught:
        get_family("imag5")
    assert "\n" not in str(caught.value)


def test_register_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedpal.models.families.FAMILIES", dict(FAMILIES))  # restored after the test
    register_family("pair", ("img_mlp", "img_cnn4"), "two image models")
    assert get_family("pair") == ("img_mlp", "img_cnn4")
    with pytest.raises(UserError, match=r"unknown model 'img_cnn5'.*did you mean"):
        register_family("bad", ("img_mlp", "img_cnn5"), "a typo")
    with pytest.raises(UserError, match="at least one architecture"):
        register_family("empty", (), "nothing")
