"""FedMosaic's frozen trunks: two sizes with named linear layers, one tokenizer per modality, the public split that no
client holds, multi-task pre-training and its checkpoint, `fedpal run` with a trunk, and freezing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedpal import api
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.config import DataConfig, PretrainConfig, from_dict
from fedpal.data.federated import build_federated_data
from fedpal.data.sources.base import Dataset
from fedpal.data.sources.registry import get_dataset_spec, load_dataset
from fedpal.engine.assembly import build_algorithm
from fedpal.errors import ConfigError, UserError
from fedpal.models.mosaic_trunk import (
    SIZES,
    ImageTokenizer,
    ImuTokenizer,
    MosaicTrunk,
    TextTokenizer,
    block_linear_names,
    freeze_trunk,
    trunk_state,
)
from fedpal.models.registry import build_model
from fedpal.pretraining import PRETRAINED_FILE, load_pretrained, read_pretrained, save_pretrained
from fedpal.pretraining.multitask import (
    PublicSplit,
    pretrain_multitask,
    public_rows,
    public_split,
    readout,
)

DIGITS_RUN = DataConfig(
    dataset="digits", partition="dirichlet", alpha=0.5, num_clients=4, min_samples=20, max_samples=600
)
FAST = PretrainConfig(method="multitask", model="mosaic_small", epochs=3, batch_size=32, lr=3e-3)


def imu_split(n: int = 192, seed: int = 0) -> PublicSplit:
    """Synthetic [6, 128] windows whose class (0..2) is the channel pair that carries a sine; learnable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 6, 128, generator=g)
    wave = torch.sin(torch.arange(128) / 4.0)
    for c in range(3):
        x[y == c, 2 * c : 2 * c + 2] += wave
    return PublicSplit("imu_toy", np.arange(n), x, y, 3)


@pytest.fixture(scope="module")
def digits_public() -> PublicSplit:
    return public_split("digits", DIGITS_RUN, seed=0, count=400)


@pytest.fixture(scope="module")
def pretrained(digits_public: PublicSplit) -> Any:
    return pretrain_multitask([digits_public, imu_split()], "small", FAST, seed=0)


# ---- the trunks


def test_the_two_sizes_differ_in_width_and_depth_and_name_their_linear_layers() -> None:
    small, large = MosaicTrunk("small"), MosaicTrunk("large")
    assert (small.width, len(small.blocks)) == (64, 2) and (large.width, len(large.blocks)) == (128, 4)
    for trunk in (small, large):
        w = trunk.width
        names = block_linear_names(trunk)
        expected = [
            f"blocks.{i}.{layer}"
            for i in range(trunk.depth)
            for layer in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")
        ]
        assert names == expected
        layers = dict(trunk.named_modules())
        shapes = {"attn.qkv": (w, 3 * w), "attn.out": (w, w), "mlp.up": (w, 4 * w), "mlp.down": (4 * w, w)}
        for name in names:
            layer = layers[name]
            assert type(layer) is nn.Linear
            assert (layer.in_features, layer.out_features) == shapes[name.split(".", 2)[2]]
        assert isinstance(trunk.norm, nn.LayerNorm) and trunk.norm.normalized_shape == (w,)


def test_a_blocks_attention_is_multi_head_attention() -> None:
    """The written-out attention equals torch's own multi-head attention with the same projections."""
    torch.manual_seed(0)
    block = MosaicTrunk("large").blocks[0]
    attention = block.attn
    reference = nn.MultiheadAttention(128, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.out.weight)
        reference.out_proj.bias.copy_(attention.out.bias)
    x = torch.randn(3, 17, 128)
    torch.testing.assert_close(attention(x), reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_the_image_tokenizer_embeds_each_7x7_patch_in_reading_order() -> None:
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(64)
    x = torch.randn(3, 1, 28, 28)
    tokens = tokenizer(x)
    assert tokens.shape == (3, 16, 64)
    for r in range(4):
        for c in range(4):
            patch = x[:, 0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7].reshape(3, 49)
            expected = patch @ tokenizer.patch.weight.T + tokenizer.patch.bias + tokenizer.position[4 * r + c]
            torch.testing.assert_close(tokens[:, 4 * r + c], expected)
    # another image size is resized to 28 x 28 first: a constant image stays constant, so every patch is the same
    flat = tokenizer(torch.full((2, 1, 8, 8), 0.5)) - tokenizer.position
    assert flat.shape == (2, 16, 64)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat))


def test_the_imu_and_text_tokenizers_give_one_token_per_frame_and_per_character() -> None:
    torch.manual_seed(0)
    imu = ImuTokenizer(32)
    x = torch.randn(2, 6, 128)
    tokens = imu(x)
    assert tokens.shape == (2, 8, 32)
    for z in range(8):
        frame = torch.cat([x[:, ch, 16 * z : 16 * z + 16] for ch in range(6)], dim=1)  # channel 0's samples first
        torch.testing.assert_close(tokens[:, z], frame @ imu.frame.weight.T + imu.frame.bias + imu.position[z])
    text = TextTokenizer(32)
    ids = torch.tensor([[3, 3, 70], [0, 80, 3]])
    tokens = text(ids)
    assert tokens.shape == (2, 3, 32)
    torch.testing.assert_close(tokens[0, 1] - text.position[1], tokens[1, 2] - text.position[2])  # same character


def test_one_trunk_runs_images_imu_windows_and_text() -> None:
    torch.manual_seed(0)
    trunk = MosaicTrunk("small", tasks=3).eval()
    inputs = {"image": torch.randn(4, 1, 28, 28), "imu": torch.randn(4, 6, 128), "text": torch.randint(0, 81, (4, 80))}
    lengths = {"image": 16, "imu": 8, "text": 80}
    for modality, x in inputs.items():
        encoded = trunk.encode(x)
        assert encoded.shape == (4, 1 + lengths[modality], 64)  # the modality token, then the tokenizer's tokens
        torch.testing.assert_close(trunk(x), encoded.mean(dim=1))  # the feature is the pooled output
        assert trunk.encode(x, task=torch.tensor([0, 1, 2, 0])).shape == (4, 2 + lengths[modality], 64)
        # samples do not see each other: a sample's feature is the same alone and in the batch
        torch.testing.assert_close(trunk(x[1:2]), trunk(x)[1:2], rtol=1e-5, atol=1e-6)
    with_task = trunk(inputs["image"], task=torch.tensor([0, 1, 2, 0]))
    assert not torch.allclose(with_task[0], with_task[1])  # the same image under another task token
    image_only = MosaicTrunk("small", ["image"])
    with pytest.raises(UserError, match="no imu tokenizer"):
        image_only(inputs["imu"])


def test_registered_trunks_pick_the_tokenizer_from_the_input_shape() -> None:
    for name, size in (("mosaic_small", "small"), ("mosaic_large", "large")):
        for shape, modality in (((1, 28, 28), "image"), ((1, 8, 8), "image"), ((6, 128), "imu"), ((80,), "text")):
            model = build_model(name, shape, 7, 32, 0)
            trunk = model.backbone.trunk  # type: ignore[union-attr]
            assert trunk.size == size and list(trunk.tokenizers) == [modality]
            x = torch.randint(0, 81, (3, *shape)) if len(shape) == 1 else torch.randn(3, *shape)
            assert model(x).shape == (3, 7) and model.features(x).shape == (3, 32)
    with pytest.raises(UserError, match="mosaic trunks take"):
        build_model("mosaic_small", (3, 32, 32), 10, 32, 0)
    with pytest.raises(UserError, match="mosaic trunks take"):
        build_model("mosaic_small", (6, 100), 10, 32, 0)
    # "pool" to the trunk width: the feature is the pooled trunk output itself
    model = build_model("mosaic_large", (6, 128), 5, SIZES["large"].width, 0, "pool")
    x = torch.randn(2, 6, 128)
    torch.testing.assert_close(model.features(x), model.backbone.trunk(x))  # type: ignore[union-attr]


# ---- the public split


def source_rows(dataset: Dataset, x: torch.Tensor) -> np.ndarray:
    """The source row of every sample of ``x``, found by its pixels (digits has no two equal images)."""
    index = {row.tobytes(): i for i, row in enumerate(dataset.inputs().reshape(len(dataset), -1))}
    return np.array([index[row.tobytes()] for row in x.reshape(len(x), -1).numpy()], dtype=np.int64)


def test_the_public_split_is_disjoint_from_every_clients_data(digits_public: PublicSplit) -> None:
    digits = load_dataset("digits")
    assert len(np.unique(digits.inputs().reshape(len(digits), -1), axis=0)) == len(digits)
    cfg = from_dict({"data": {**dataclasses.asdict(DIGITS_RUN), "unseen_clients": 1}})
    data = build_federated_data(cfg.data, cfg.seed)
    held = np.concatenate(
        [
            source_rows(digits, getattr(c, f"{split}_x"))
            for c in data.clients + data.unseen
            for split in ("train", "val", "test")
        ]
    )
    assert held.size == 600 and np.unique(held).size == 600  # every client sample, held-out clients included
    public = public_split("digits", cfg.data, cfg.seed, count=400)
    assert len(public.rows) == 400 and np.intersect1d(public.rows, held).size == 0
    assert np.array_equal(source_rows(digits, public.x), public.rows)  # the split's inputs are its rows
    assert np.array_equal(public.y.numpy(), digits.y[public.rows])
    assert np.bincount(public.y.numpy(), minlength=10).min() >= 35  # class-stratified
    # another seed's federation keeps other rows: the split follows it and still avoids it
    other = build_federated_data(cfg.data, seed=1)
    held_other = np.concatenate([source_rows(digits, c.train_x) for c in other.clients])
    assert np.intersect1d(public_split("digits", cfg.data, 1, 400).rows, held_other).size == 0


def grouped_source(users: int = 10, per_user: int = 30) -> Dataset:
    y = np.tile(np.arange(3), users * per_user // 3).astype(np.int64)
    groups = np.repeat(np.arange(users), per_user).astype(np.int64)
    return Dataset("toy_users", np.zeros((len(y), 6, 128), np.float32), y, 3, ("a", "b", "c"), groups=groups)


def test_grouped_sources_hold_out_whole_users_after_the_natural_clients() -> None:
    source = grouped_source()
    natural = DataConfig(dataset="toy_users", partition="natural", num_clients=6)
    rows, groups = public_rows("toy_users", source, natural, seed=0, count=50)
    assert groups == [8, 9]  # the last users, enough for 50 windows; none of the 6 clients' users
    assert np.array_equal(rows, np.flatnonzero(np.isin(source.groups, [8, 9])))
    rows, groups = public_rows("toy_users", source, natural, seed=0, count=10_000)
    assert groups == [6, 7, 8, 9]  # at most every user the federation leaves out
    with pytest.raises(UserError, match="natural"):  # every user is a client: nothing is public
        public_rows("toy_users", source, DataConfig(dataset="toy_users", partition="natural", num_clients=0), 0, 50)
    with pytest.raises(UserError, match="natural"):  # a subsample cuts users; no user is free as a whole
        public_rows("toy_users", source, DataConfig(dataset="toy_users", partition="iid", max_samples=200), 0, 50)
    # the federation holds no row of a source it does not use: the split is the last users then
    assert public_rows("toy_users", source, DataConfig(dataset="digits"), 0, 50)[1] == [8, 9]
    with pytest.raises(UserError, match=r"part of data\.dataset 'multisource'"):
        public_rows("mnist", source, DataConfig(dataset="multisource"), 0, 50)
    digits = load_dataset("digits")
    with pytest.raises(UserError, match="max_samples"):  # the federation may hold every digit
        public_rows("digits", digits, DataConfig(dataset="digits"), 0, 50)


@pytest.mark.skipif(not get_dataset_spec("hapt").is_installed(), reason="HAPT is not installed")
def test_hapt_public_users_are_not_clients() -> None:
    cfg = DataConfig(dataset="hapt", partition="natural", num_clients=24, split="chronological")
    data = build_federated_data(cfg, seed=0)
    public = public_split("hapt", cfg, seed=0, count=2000)
    source = load_dataset("hapt")
    users = np.unique(source.groups)
    client_users = users[data.client_ids + data.unseen_ids]
    assert np.intersect1d(client_users, public.groups).size == 0 and len(public.y) >= 2000
    assert set(np.unique(source.groups[public.rows])) == set(public.groups)
    for group in (0, 1):  # each channel group is z-scored with the public windows' own statistics
        values = public.x[:, 3 * group : 3 * group + 3]
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-3


# ---- pre-training and its checkpoint


def test_pretraining_lowers_every_sources_loss(pretrained: Any) -> None:
    assert len(pretrained.losses) == FAST.epochs and pretrained.windows == 400 + 192
    assert pretrained.losses[-1] < 0.8 * pretrained.losses[0]
    for source, record in pretrained.public.items():
        assert record["losses"][-1] < record["losses"][0], source
    assert pretrained.public["digits"]["modality"] == "image" and pretrained.public["imu_toy"]["modality"] == "imu"
    # the epoch loss is the sample-weighted mean of the sources' losses
    d, m = pretrained.public["digits"]["losses"][-1], pretrained.public["imu_toy"]["losses"][-1]
    assert pretrained.losses[-1] == pytest.approx((400 * d + 192 * m) / 592)


def test_the_checkpoint_loads_into_fresh_trunks_bit_for_bit(pretrained: Any, tmp_path: Path) -> None:
    path = save_pretrained(tmp_path / "trunk.pt", pretrained.tensors, {"public": pretrained.public})
    tensors, meta = read_pretrained(path)
    assert meta["public"]["digits"]["rows"] == [int(r) for r in public_split("digits", DIGITS_RUN, 0, 400).rows]
    for shape, unused_tokenizer in (((1, 8, 8), "imu"), ((6, 128), "image")):
        model = build_model("mosaic_small", shape, 3, 16, 0)
        head = model.head.weight.detach().clone()
        report = load_pretrained(model, path)
        state = model.state_dict()
        trunk_names = [n for n in state if n.startswith("backbone.trunk.")]
        assert sorted(report.loaded) == sorted(trunk_names)
        for name in trunk_names:
            assert torch.equal(state[name], tensors[name]), name
        assert any(f"tokenizers.{unused_tokenizer}." in n for n in report.unused)
        assert any(n.startswith("readouts.") for n in report.unused)
        assert torch.equal(model.head.weight, head)  # the run's head keeps its seeded initialisation
    bare = MosaicTrunk("small", ["image", "imu"])
    bare.load_state_dict(trunk_state(tensors))  # strict: the checkpoint is exactly this trunk
    x = torch.randn(5, 1, 8, 8)
    fresh = build_model("mosaic_small", (1, 8, 8), 3, 64, 0, "pool")
    load_pretrained(fresh, path)
    assert torch.equal(fresh.features(x), bare(x))


def test_a_sources_readout_is_the_frozen_head_of_its_task_family(pretrained: Any, digits_public: PublicSplit) -> None:
    model = build_model("mosaic_small", (1, 8, 8), 10, SIZES["small"].width, 0, "pool").eval()
    head = readout(pretrained.tensors, "digits")
    trunk = {name: t for name, t in pretrained.tensors.items() if name.startswith("backbone.trunk.tokenizers.image.")}
    trunk |= {
        n: t for n, t in pretrained.tensors.items() if n.startswith("backbone.trunk.") and ".tokenizers." not in n
    }
    model.load_state_dict({**trunk, **head})  # strict: trunk + readout are the whole model
    with torch.no_grad():
        logits = model(digits_public.x)
        weight, bias = pretrained.tensors["readouts.digits.weight"], pretrained.tensors["readouts.digits.bias"]
        expected = model.backbone.trunk(digits_public.x) @ weight.T + bias  # type: ignore[operator]
    torch.testing.assert_close(logits, expected)
    assert (logits.argmax(1) == digits_public.y).float().mean() > 0.3  # 3 epochs: well above chance (0.1)
    with pytest.raises(UserError, match="no readout for 'mnist'"):
        readout(pretrained.tensors, "mnist")


def test_multitask_needs_a_mosaic_trunk_and_distinct_sources() -> None:
    with pytest.raises(ConfigError, match="mosaic_small"):
        from_dict({"pretrain": {"method": "multitask"}})
    with pytest.raises(ConfigError, match="'mae' pre-trains"):
        from_dict({"pretrain": {"method": "mae", "model": "mosaic_small"}})
    with pytest.raises(ConfigError, match="distinct"):
        from_dict({"pretrain": {"method": "multitask", "model": "mosaic_small", "sources": ["digits", "digits"]}})
    with pytest.raises(ConfigError, match="public_samples"):
        from_dict({"pretrain": {"public_samples": 0}})


# ---- runs


def test_fedpal_run_with_a_trunk_pretrains_once_and_starts_from_the_checkpoint(
    tiny: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    raw = tiny(
        model={"name": "mosaic_small", "feature_dim": 16},
        train={"rounds": 1, "optimizer": "adam", "lr": 1e-3},
        pretrain={
            "method": "multitask",
            "model": "mosaic_small",
            "sources": ["digits"],
            "public_samples": 200,
            "epochs": 1,
        },
    )
    result = api.run(raw, out=tmp_path / "run")
    assert result.summary["rounds"] == 1 and 0.0 <= result.personalized_accuracy <= 1.0
    checkpoint = tmp_path / "run" / PRETRAINED_FILE
    tensors, meta = read_pretrained(checkpoint)
    held = public_split("digits", from_dict(raw).data, 0, 200).rows
    assert meta["method"] == "multitask" and meta["public"]["digits"]["rows"] == [int(r) for r in held]
    # model.pretrained = that file: every architecture's module starts from the checkpoint's trunk, bit for bit
    cfg = from_dict({**raw, "model": {**raw["model"], "pretrained": str(checkpoint)}})
    _, trainers = build_algorithm(cfg, build_federated_data(cfg.data, cfg.seed))
    state = trainers["mosaic_small"].module.state_dict()
    for name, tensor in tensors.items():
        if name in state:
            assert torch.equal(state[name], tensor), name
    assert any(name.startswith("backbone.trunk.blocks.1.mlp.down") for name in tensors)


def test_a_trunk_run_is_the_same_under_the_sequential_and_batched_executors(
    tiny: Callable[..., dict[str, Any]],
) -> None:
    def run(executor: str) -> dict[str, Any]:
        raw = tiny(
            model={"name": "mosaic_small", "feature_dim": 16},
            train={"rounds": 1, "optimizer": "adam", "lr": 3e-3},
            run={"progress": False, "executor": executor},
        )
        return api.run(raw).summary["personalized"]

    sequential, batched = run("sequential"), run("batched")
    assert sequential["per_client_accuracy"] == batched["per_client_accuracy"]
    assert sequential["loss"] == pytest.approx(batched["loss"], rel=1e-5)


# ---- freezing


def test_freezing_leaves_no_trainable_trunk_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("mosaic_large", (1, 28, 28), 10, 32, 0)
    trunk = model.backbone.trunk  # type: ignore[union-attr]
    count = freeze_trunk(model)
    assert count == sum(p.numel() for p in trunk.parameters()) > 0
    assert not any(p.requires_grad for p in trunk.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.projection.0.weight", "backbone.projection.0.bias", "head.weight", "head.bias"}
    assert freeze_trunk(model) == 0  # nothing left to freeze
    # a training pass through the one loop moves the head and leaves the trunk bit for bit
    trainer = LocalTrainer(model, TrainSettings(1, 16, 0.05, "sgd", 0.0, 0.0))
    before = trainer.snapshot()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    after = trainer.fit(before, x, y, g).params
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in trainable), name
    with pytest.raises(UserError, match="no mosaic trunk"):
        freeze_trunk(nn.Linear(2, 2))


def test_fedpal_pretrain_makes_a_multitask_checkpoint_in_one_command(
    tiny: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpal.cli import main
    from fedpal.config import to_toml

    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny(model={"name": "mosaic_small", "feature_dim": 16})))
    pretrain = ["pretrain.method=multitask", "pretrain.model=mosaic_small", 'pretrain.sources=["digits"]']
    pretrain += ["pretrain.public_samples=200", "pretrain.epochs=1"]
    argv = ["pretrain", str(config), "--out", str(tmp_path / "trunk.pt"), "--quiet"]
    assert main(argv + [a for item in pretrain for a in ("--set", item)]) == 0
    out = capsys.readouterr().out
    assert "(multi-task) on 200 public samples that no client holds, 1 epochs" in out
    _, meta = read_pretrained(tmp_path / "trunk.pt")
    assert meta["method"] == "multitask" and meta["public"]["digits"]["rows"]


# ---- task-tagged inputs (FedMosaic's task stream)


def tagged_model(size: str = "small") -> nn.Module:
    from fedpal.models.mosaic_trunk import TaskReadoutModel

    label_tasks = [0] * 10 + [1] * 2 + [2] * 6  # digits, parity, activities
    torch.manual_seed(0)
    model = build_model("mosaic_" + size, (786,), 18, SIZES[size].width, 200, "pool", {"label_tasks": label_tasks})
    assert isinstance(model, TaskReadoutModel)
    return model.eval()


def test_tagged_rows_get_the_features_of_their_own_modality_and_task() -> None:
    """A mixed, shuffled batch of tagged rows gives each row the feature its modality's path gives it alone, with
    its task token: grouping by modality changes nothing but the order of work."""
    from fedpal.data.tagged_inputs import tag

    model = tagged_model()
    trunk = model.backbone.trunk
    images, windows = torch.rand(5, 1, 28, 28), torch.randn(4, 6, 128)
    rows = torch.cat([tag(images[:3], 0, "image"), tag(windows, 2, "imu"), tag(images[3:], 1, "image")])
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = trunk(rows[order])
        alone = torch.cat(
            [
                trunk(images[:3], torch.zeros(3, dtype=torch.long)),
                trunk(windows, torch.full((4,), 2)),
                trunk(images[3:], torch.ones(2, dtype=torch.long)),
            ]
        )
    torch.testing.assert_close(mixed, alone[order], rtol=1e-5, atol=1e-6)
    # the task token matters: the same image as another task is another feature
    with torch.no_grad():
        assert not torch.allclose(trunk(tag(images[:1], 0, "image")), trunk(tag(images[:1], 1, "image")))


def test_a_task_readout_answers_only_with_the_rows_task_classes() -> None:
    from fedpal.data.tagged_inputs import tag

    model = tagged_model()
    rows = torch.cat([tag(torch.rand(6, 1, 28, 28), 1, "image"), tag(torch.randn(6, 6, 128), 2, "imu")])
    with torch.no_grad():
        logits = model(rows)
    predicted = logits.argmax(dim=1)
    assert predicted[:6].ge(10).all() and predicted[:6].lt(12).all()  # parity's two classes
    assert predicted[6:].ge(12).all()  # the activities
    # the cross-entropy of a row's own label is finite and its gradient reaches no other task's head rows
    model.train()
    loss = nn.functional.cross_entropy(model(rows[:6]), torch.tensor([10, 11, 10, 11, 10, 11]))
    loss.backward()
    grad = model.head.weight.grad
    assert torch.isfinite(loss) and grad is not None
    assert grad[:10].abs().max() == 0 and grad[12:].abs().max() == 0 and grad[10:12].abs().max() > 0


def test_untagged_inputs_keep_the_plain_model() -> None:
    model = build_model("mosaic_small", (1, 28, 28), 10, 64, 200, "pool", {"label_tasks": []})
    assert type(model).__name__ == "SplitModel"


def test_task_stream_pretraining_tunes_the_trunk_on_native_tasks_and_probes_every_readout() -> None:
    """Phase 1 trains the whole model on the native tasks only, phase 2 only the readout on every task: a new
    task's token keeps its initialisation (the trunk never trained for it), while its readout rows and the native
    tasks' token are trained."""
    pytest.importorskip("animal_mnist")
    from fedpal.data.task_stream import TASK_IDS, task_offsets
    from fedpal.pretraining.multitask import native_tasks, pretrain_task_stream, task_stream_model

    raw = {
        "data": {"dataset": "task_stream", "num_clients": 10, "task_public_samples": 60},
        "model": {"name": "mosaic_small", "feature_dim": 64, "projection": "pool"},
        "pretrain": {"method": "multitask", "model": "mosaic_small", "epochs": 1, "public_samples": 60},
    }
    config = from_dict(raw)
    start = task_stream_model(config).state_dict()
    result = pretrain_task_stream(config)
    tokens, head = "backbone.trunk.task_tokens.weight", "head.weight"
    parity, digits = TASK_IDS["digit_parity"], TASK_IDS["digits"]
    assert digits in native_tasks() and parity not in native_tasks()
    assert torch.equal(result.tensors[tokens][parity], start[tokens][parity])
    assert not torch.equal(result.tensors[tokens][digits], start[tokens][digits])
    rows = slice(int(task_offsets()[parity]), int(task_offsets()[parity + 1]))
    assert not torch.equal(result.tensors[head][rows], start[head][rows])
    assert len(result.losses) == 2
