"""Model registry: shapes, the backbone -> feature -> head split, and the FedAvgCNN layer sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedpal
from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.registry import MODELS, build_model, register_model

SHAPES = [
    ("mlp", (1, 8, 8)),
    ("mlp", (6, 128)),
    ("cnn", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("cnn", (3, 32, 32)),
    ("har_cnn", (6, 128)),
]


@pytest.mark.parametrize(("name", "shape"), SHAPES)
@pytest.mark.parametrize("feature_dim", [7, 24])
def test_models_map_inputs_to_logits_through_a_feature(name: str, shape: tuple[int, ...], feature_dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=5, feature_dim=feature_dim, hidden_dim=11)
    assert isinstance(model, SplitModel)
    x = torch.randn(3, *shape)
    logits = model(x)
    features = model.features(x)
    assert logits.shape == (3, 5)
    assert features.shape == (3, feature_dim)
    assert model.feature_dim == feature_dim and model.num_classes == 5
    assert isinstance(model.head, nn.Linear) and model.head.in_features == feature_dim
    assert torch.allclose(model.head(features), logits)
    # no buffers (no batch norm): FedAvg of the parameters is the whole model
    assert list(model.named_buffers()) == []


def test_registered_models_are_all_covered() -> None:
    assert {"mlp", "cnn", "har_cnn"} <= set(MODELS)


def test_cnn_on_28x28_has_the_fedavgcnn_layer_sizes() -> None:
    model = build_model("cnn", (1, 28, 28), num_classes=10, feature_dim=512, hidden_dim=200)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (5, 5), (0, 0)),
        (32, 64, (5, 5), (0, 0)),
    ]
    dense = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: 64 * 4 * 4 = 1024 inputs to the dense layer
    assert [(d.in_features, d.out_features) for d in dense] == [(1024, 512)]
    expected = (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (1024 * 512 + 512) + (512 * 10 + 10)
    assert expected == 582_026
    assert sum(p.numel() for p in model.parameters()) == expected


def test_cnn_pads_small_images_so_both_pools_fit() -> None:
    model = build_model("cnn", (1, 8, 8), num_classes=10, feature_dim=64, hidden_dim=200)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (2, 2) for c in convs)
    dense = next(m for m in model.backbone.modules() if isinstance(m, nn.Linear))
    assert dense.in_features == 64 * 2 * 2  # 8 -> 8 -> 4 -> 4 -> 2


def test_har_cnn_on_hapt_windows() -> None:
    model = build_model("har_cnn", (6, 128), num_classes=12, feature_dim=128, hidden_dim=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert convs[0].in_channels == 6
    assert model(torch.randn(4, 6, 128)).shape == (4, 12)
    assert model.features(torch.randn(4, 6, 128)).shape == (4, 128)


def test_mlp_sizes() -> None:
    model = build_model("mlp", (1, 8, 8), num_classes=10, feature_dim=16, hidden_dim=32)
    assert sum(p.numel() for p in model.parameters()) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


@pytest.mark.parametrize(("name", "shape"), [("cnn", (6, 128)), ("cnn", (64,)), ("har_cnn", (1, 8, 8))])
def test_models_reject_inputs_of_the_wrong_rank(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match=f"model '{name}' needs"):
        build_model(name, shape, 10, 16, 16)


def test_unknown_model_is_a_user_error_with_a_hint() -> None:
    with pytest.raises(UserError, match=r"unknown model 'cnnn'.*did you mean 'cnn'"):
        build_model("cnnn", (1, 8, 8), 10, 16, 16)


def test_a_registered_model_runs_end_to_end(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_linear(shape, num_classes, feature_dim, hidden_dim):
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), feature_dim))
        return SplitModel(backbone, feature_dim, num_classes)

    monkeypatch.setitem(MODELS, "test_linear", MODELS["mlp"])  # restored after the test
    register_model("test_linear", build_linear, "a linear backbone")
    result = fedpal.run(tiny(model={"name": "test_linear", "feature_dim": 5}, train={"rounds": 1}))
    params = (64 * 5 + 5) + (5 * 10 + 10)
    assert result.summary["bytes"]["down"] == 4 * params * 4
    assert result.summary["model"] == "test_linear"
