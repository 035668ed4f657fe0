"""Config validation: unknown keys (with the closest valid key), types, ranges, algorithm tables, --set parsing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedpal.algorithms.core.registry import get_algorithm_class
from fedpal.config import (
    ExperimentConfig,
    all_keys,
    apply_overrides,
    from_dict,
    load_config,
    parse_value,
    read_toml,
    to_toml,
)
from fedpal.errors import ConfigError, UserError


def test_defaults_are_valid_and_documented() -> None:
    cfg = load_config()
    assert cfg == from_dict({})
    assert cfg.algorithm == {"name": "fedavg", "evaluate": "global"}
    assert cfg.train.rounds == 20 and cfg.data.train_fraction + cfg.data.val_fraction + cfg.data.test_fraction == 1
    assert {"train.rounds", "data.dataset", "eval.every", "model.feature_dim", "seed", "algorithm.name"} <= set(
        all_keys()
    )
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"round": 3}}, "unknown config key 'train.round'; did you mean 'train.rounds'?"),
        ({"data": {"datset": "digits"}}, "did you mean 'data.dataset'?"),
        ({"eval": {"evry": 2}}, "did you mean 'eval.every'?"),
        ({"sed": 1}, "did you mean 'seed'?"),
        ({"trian": {"rounds": 1}}, "did you mean 'train'?"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert message in str(info.value)


def test_unknown_key_without_a_close_match_has_no_hint() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"train": {"zzzzzzzz": 1}})
    assert "unknown config key 'train.zzzzzzzz'" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"rounds": "3"}}, "'train.rounds' must be int, got str"),
        ({"train": {"rounds": 2.5}}, "'train.rounds' must be int, got float"),
        ({"train": {"rounds": True}}, "'train.rounds' must be int, got bool"),
        ({"train": {"lr": "fast"}}, "'train.lr' must be float"),
        ({"train": {"lr": False}}, "'train.lr' must be float"),
        ({"data": {"dataset": 3}}, "'data.dataset' must be str"),
        ({"run": {"progress": 1}}, "'run.progress' must be bool"),
        ({"seed": "zero"}, "'seed' must be int"),
        ({"train": 3}, "'train' must be a table"),
        ({"algorithm": "fedavg"}, "'algorithm' must be a table"),
        ({"algorithm": {"name": 3}}, "'algorithm.name' must be a string"),
        ({"algorithms": {"fedprox": 1}}, "one table per algorithm"),
    ],
)
def test_wrong_types_are_config_errors(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert fragment in str(info.value)


def test_ints_are_accepted_where_floats_are_expected() -> None:
    cfg = from_dict({"train": {"lr": 1}, "data": {"alpha": 2}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.data.alpha, float)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"rounds": 0}}, "train.rounds"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"lr": 0.0}}, "train.lr"),
        ({"train": {"client_fraction": 0.0}}, "train.client_fraction"),
        ({"train": {"client_fraction": 1.5}}, "train.client_fraction"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"eval": {"every": 0}}, "eval.every"),
        ({"data": {"num_clients": 0}}, "data.num_clients"),
        ({"data": {"alpha": 0.0}}, "data.alpha"),
        ({"data": {"train_fraction": 0.5}}, "sum to 1"),
        ({"data": {"train_fraction": 0.0, "val_fraction": 0.5, "test_fraction": 0.5}}, "data.train_fraction"),
        ({"data": {"split": "random"}}, "data.split"),
        ({"model": {"feature_dim": 0}}, "model.feature_dim"),
    ],
)
def test_values_that_cannot_work_are_rejected_before_loading_data(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        from_dict(raw)


# --------------------------------------------------------------------------------------------- algorithms


def test_unknown_algorithm_is_a_user_error_with_a_hint() -> None:
    with pytest.raises(UserError, match=r"unknown algorithm 'fedprx'.*did you mean 'fedprox'"):
        from_dict({"algorithm": {"name": "fedprx"}})


def test_algorithm_hyperparameters_are_typed_and_defaulted() -> None:
    assert from_dict({"algorithm": {"name": "fedprox"}}).algorithm == {
        "name": "fedprox",
        "evaluate": "global",
        "mu": 0.01,
    }
    assert from_dict({"algorithm": {"name": "fedprox", "mu": 1}}).algorithm == {
        "name": "fedprox",
        "evaluate": "global",
        "mu": 1.0,
    }
    ft = from_dict({"algorithm": {"name": "fedavg_ft"}}).algorithm
    assert ft == {"name": "fedavg_ft", "finetune_epochs": 1, "finetune_lr": 0.0}
    hint = "unknown config key 'algorithm.muu'; did you mean 'algorithm.mu'?"
    with pytest.raises(ConfigError, match=re.escape(hint)):
        from_dict({"algorithm": {"name": "fedprox", "muu": 0.1}})
    with pytest.raises(ConfigError, match=re.escape("'algorithm.mu' must be float")):
        from_dict({"algorithm": {"name": "fedprox", "mu": "big"}})
    with pytest.raises(ConfigError, match=re.escape("'algorithm.mu' is a hyperparameter of fedprox")):
        from_dict({"algorithm": {"name": "fedavg", "mu": 0.1}})  # FedAvg has no mu: an error, not ignored


def test_algorithms_tables_give_per_algorithm_defaults() -> None:
    tables = {"fedprox": {"mu": 0.5}, "fedavg_ft": {"finetune_epochs": 3}}
    assert from_dict({"algorithm": {"name": "fedprox"}, "algorithms": tables}).algorithm["mu"] == 0.5
    assert from_dict({"algorithm": {"name": "fedavg_ft"}, "algorithms": tables}).algorithm["finetune_epochs"] == 3
    # [algorithm] overrides the table
    assert from_dict({"algorithm": {"name": "fedprox", "mu": 0.2}, "algorithms": tables}).algorithm["mu"] == 0.2
    # the chosen algorithm ignores other algorithms' tables, but every table is validated
    assert from_dict({"algorithm": {"name": "fedavg"}, "algorithms": tables}).algorithm == {
        "name": "fedavg",
        "evaluate": "global",
    }
    with pytest.raises(ConfigError, match=re.escape("algorithms.fedprox.muu")):
        from_dict({"algorithm": {"name": "fedavg"}, "algorithms": {"fedprox": {"muu": 1.0}}})
    with pytest.raises(UserError, match="unknown algorithm 'nosuch'"):
        from_dict({"algorithms": {"nosuch": {}}})


# --------------------------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("true", True),
        ("false", False),
        ("fedprox", "fedprox"),
        ('"quoted string"', "quoted string"),
        ("/data/fashion-mnist", "/data/fashion-mnist"),
        ("two words", "two words"),
    ],
)
def test_set_values_parse_as_toml_with_bare_words_as_strings(text: str, value: object) -> None:
    parsed = parse_value(text)
    assert parsed == value
    assert type(parsed) is type(value)


def test_overrides_build_nested_keys_and_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('seed = 1\n[train]\nrounds = 5\nlr = 0.1\n[algorithm]\nname = "fedprox"\nmu = 0.3\n')
    cfg = load_config(
        path, ["train.rounds=7", "data.dataset=digits", "algorithm.mu=0.9", "run.progress=false", "seed = 4"]
    )
    assert cfg.train.rounds == 7 and cfg.train.lr == 0.1
    assert cfg.data.dataset == "digits"
    assert cfg.algorithm == {"name": "fedprox", "evaluate": "global", "mu": 0.9}
    assert cfg.run.progress is False
    assert cfg.seed == 4
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.rounds"], "must be key=value"),
        (["train.round=3"], "did you mean 'train.rounds'"),
        (["train.rounds=abc"], "'train.rounds' must be int, got str"),
        (["train.lr=true"], "'train.lr' must be float"),
        (["seed=1", "seed.x=1"], "does not name a section"),
        (["algorithm.name=fedfoo"], "unknown algorithm 'fedfoo'"),
    ],
)
def test_bad_overrides_are_user_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------- files


def test_read_toml_failures_are_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        read_toml(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"seed = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(binary)


def test_resolved_config_round_trips_through_toml() -> None:
    cfg = from_dict(
        {
            "seed": 3,
            "data": {"dataset": "digits", "fashion_mnist_dir": 'C:\\data\\"fm"', "alpha": 0.05},
            "train": {"lr": 1e-5, "rounds": 2},
            "run": {"progress": False},
            "algorithm": {"name": "fedprox", "mu": 0.25},
        }
    )
    text = to_toml(cfg.to_dict())
    again = from_dict(tomllib.loads(text))
    assert again == cfg
    assert isinstance(again, ExperimentConfig)
    assert again.to_dict() == cfg.to_dict()


def test_bare_words_in_set_are_strings_even_if_toml_reads_them_as_numbers():
    from fedpal.config import parse_value

    assert parse_value("inf") == "inf"
    assert parse_value("nan") == "nan"
    assert parse_value("mnist") == "mnist"
    assert parse_value("true") is True
    assert parse_value("1e-3") == 1e-3


def test_python_api_overrides_are_a_mapping_of_values() -> None:
    from fedpal.api import resolve

    raw = {"algorithm": {"name": "fedprox"}, "data": {"dataset": "digits"}}
    cfg = resolve(raw, {"algorithm.mu": 0.25, "train.rounds": 7, "data.alpha": 1})
    assert cfg.algorithm["mu"] == 0.25 and cfg.train.rounds == 7 and cfg.data.alpha == 1
    assert resolve(raw, ["train.rounds=7"]).train.rounds == 7  # the CLI's strings still work


def test_a_hyperparameter_of_another_algorithm_says_whose_it_is() -> None:
    with pytest.raises(
        ConfigError, match=r"'algorithm\.mu' is a hyperparameter of fedprox, moon, pfedme, not of fedavg"
    ):
        from_dict({"algorithm": {"name": "fedavg", "mu": 0.1}})
    with pytest.raises(ConfigError, match=r"'algorithms\.fedprox\.mu'.*'algorithm\.mu' with algorithm\.name"):
        from_dict(apply_overrides({}, ["fedprox.mu=0.1"]))


def test_an_algorithm_recommends_the_training_settings_a_config_leaves_unset() -> None:
    fedali = load_config(overrides={"algorithm.name": "fedali", "model.name": "hart_alp"})
    assert (fedali.train.optimizer, fedali.train.lr, fedali.train.batch_size) == ("adam", 1e-3, 64)
    assert fedali.recommended_applied == {"optimizer": "adam", "lr": 1e-3, "batch_size": 64}
    # what the user sets wins, key by key; the rest is still recommended
    mine = load_config(overrides={"algorithm.name": "fedali", "train.lr": 0.01})
    assert (mine.train.optimizer, mine.train.lr) == ("adam", 0.01) and "lr" not in mine.recommended_applied
    # the written config holds the values, so reading it back runs the same settings and recommends nothing more
    again = from_dict(tomllib.loads(to_toml(fedali.to_dict())))
    assert again.train == fedali.train and again.recommended_applied == {}
    assert "recommended_applied" not in fedali.to_dict()
    # a method without recommendations keeps the documented defaults
    assert load_config().train == ExperimentConfig().train


def test_every_recommendation_is_a_valid_train_setting() -> None:
    from fedpal.algorithms.core.registry import all_algorithms
    from fedpal.config import TrainConfig, build_dataclass

    for name, cls in all_algorithms().items():
        built = build_dataclass(TrainConfig, dict(cls.recommended_training), f"{name}.recommended_training")
        assert all(getattr(built, key) == value for key, value in cls.recommended_training.items())


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_trains_as_its_method_recommends(path: Path) -> None:
    cfg = load_config(path)
    recommended = get_algorithm_class(cfg.algorithm_name).recommended_training
    assert {key: getattr(cfg.train, key) for key in recommended} == dict(recommended)
