"""Shakespeare by speaking role: the Folio parser, LEAF's 80-character windows, the vocabulary, the role filter, the
federation built from them (integer inputs, the time split), the character LSTM, and a short run on the real texts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fedpal
from fedpal.cli import main
from fedpal.config import from_dict, to_toml
from fedpal.data.client_data import FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.data.sources import registry, shakespeare
from fedpal.data.sources.base import DatasetOptions
from fedpal.data.sources.shakespeare import (
    NUM_SYMBOLS,
    SEQUENCE_LENGTH,
    UNKNOWN_ID,
    VOCABULARY,
    Role,
    encode,
    next_character_dataset,
    parse_play,
)
from fedpal.errors import ConfigError, UserError
from fedpal.models.registry import build_model

PLAY = """The Tragedie of Somebody

Actus Primus. Scoena Prima.

Enter Ham, Hor, and an Old Lord.

  Ham. Who's there?
  Hor. Friends to this ground,
And Liege-men to   the Dane

   Ham. Stand & vnfold
your selfe

And speake
Enter the Ghost.

Looke where it comes againe

   Old Laf. Generally thankfull.
  Enter Fortinbras.
with Drum and Colours
  Ol.Laf. Vncertaine life
   1.Lo.G. So tis reported sir
   Hor. Tush
 Northumberland.
'twill not appeare
  Mute.
Exeunt. Marching: after the which, a Peale
off.
Aemil. You shall not write my praise

FINIS. The Tragedie of Somebody.
THE ACTORS NAMES.
Hamlet, Prince of Denmarke.
"""


def ids_of(text: str) -> list[int]:
    """LEAF's id of each character, written independently of the loader's lookup table."""
    return [VOCABULARY.index(c) if c in VOCABULARY else UNKNOWN_ID for c in text]


def role(name: str, text: str, play: str = "play") -> Role:
    return Role(play, name, encode(text))


def filler(length: int, seed: int) -> str:
    """Deterministic text of ``length`` symbols drawn from the vocabulary."""
    picks = np.random.default_rng(seed).integers(0, len(VOCABULARY), size=length)
    return "".join(VOCABULARY[i] for i in picks)


# --- parsing


def test_parser_follows_speeches_continuations_and_directions() -> None:
    roles = parse_play(PLAY)
    assert list(roles) == ["HAM", "HOR", "OLD.LAF", "OL.LAF", "1.LO.G", "MUTE", "AEMIL"]  # first-speech order
    # the title and headings before the first speech are dropped; a blank line does not end a speech, "Enter" does,
    # so "Looke where it comes againe" belongs to nobody; whitespace runs collapse; lines join with a newline
    assert roles["HAM"] == "Who's there?\nStand & vnfold\nyour selfe\nAnd speake"
    assert roles["HOR"] == "Friends to this ground,\nAnd Liege-men to the Dane\nTush"  # a 1-space cast line ended it
    assert roles["OLD.LAF"] == "Generally thankfull."  # two words; an indented "Enter" ended the speech
    assert roles["OL.LAF"] == "Vncertaine life"  # the other spelling stays another role
    assert roles["1.LO.G"] == "So tis reported sir"
    assert roles["MUTE"] == ""  # "Exeunt" ended the speech before "off.": Mute says nothing
    # Othello's unindented Emilia; the end mark and the cast list after it continue nobody
    assert roles["AEMIL"] == "You shall not write my praise"


def test_parser_never_crashes_on_bad_text() -> None:
    assert parse_play("") == {}
    assert parse_play("\n\n   \n") == {}
    assert parse_play("no speeches at all\njust lines\n") == {}
    weird = parse_play("  Ham. \x00 caf\u00e9 \ufffd\n\u2603 snow\n")
    assert list(weird) == ["HAM"]
    ids = encode(weird["HAM"])
    assert ids.dtype == np.uint8 and (ids <= UNKNOWN_ID).all()


# --- vocabulary and windows


def test_vocabulary_is_leafs_and_every_other_character_is_unknown() -> None:
    assert len(VOCABULARY) == 80 and len(set(VOCABULARY)) == 80 and VOCABULARY[0] == "\n"
    assert NUM_SYMBOLS == 81 and UNKNOWN_ID == 80
    text = "Ab \n}" + "\u00e6`|%\u20ac\ufffd\U0001f600"
    assert encode(text).tolist() == [VOCABULARY.index(c) for c in "Ab \n}"] + [UNKNOWN_ID] * 7
    assert encode(VOCABULARY).tolist() == list(range(80))


def test_windows_are_80_characters_labelled_with_the_next_one() -> None:
    text = filler(200, seed=1) + "\u00e6" + "Caesar"  # an unknown character inside, as input and as label
    ds = next_character_dataset([role("A", text)], min_text_chars=0)
    n = len(text) - SEQUENCE_LENGTH
    assert ds.x.shape == (n, SEQUENCE_LENGTH) and ds.x.dtype == np.uint8 and len(ds.y) == n
    for i in range(n):
        assert ds.x[i].tolist() == ids_of(text[i : i + SEQUENCE_LENGTH])
        assert ds.y[i] == ids_of(text[i + SEQUENCE_LENGTH])[0]
    assert ds.y[200 - SEQUENCE_LENGTH] == UNKNOWN_ID
    assert ds.order.tolist() == list(range(n)) and set(ds.groups.tolist()) == {0}
    decoded = ds.inputs(np.array([0, n - 1]))
    assert decoded.dtype == np.int64 and decoded.tolist() == [ds.x[0].tolist(), ds.x[n - 1].tolist()]


def test_roles_are_clients_largest_first_and_short_or_empty_ones_are_dropped() -> None:
    roles = [
        role("EMPTY", ""),
        role("SHORT", filler(150, 2)),
        role("MID", filler(250, 3)),
        role("EDGE", filler(200, 4)),
        role("LONG", filler(300, 5)),
        role("WINDOW", filler(SEQUENCE_LENGTH, 6)),  # exactly one window long: no label after it
    ]
    ds = next_character_dataset(roles, min_text_chars=200)
    sizes = np.bincount(ds.groups).tolist()
    assert sizes == [300 - 80, 250 - 80, 200 - 80]  # LONG, MID, EDGE (the threshold is inclusive)
    first_of_mid = int(np.flatnonzero(ds.groups == 1)[0])
    assert ds.x[first_of_mid].tolist() == roles[2].ids[:80].tolist()
    # no minimum: every role with at least one window, the empty one skipped without a crash
    assert np.bincount(next_character_dataset(roles, min_text_chars=0).groups).tolist() == [220, 170, 120, 70]
    with pytest.raises(UserError, match=r"data\.min_text_chars"):
        next_character_dataset(roles, min_text_chars=10_000)
    with pytest.raises(UserError, match="no speaking role"):
        next_character_dataset([role("EMPTY", "")], min_text_chars=0)


# --- the federation


@pytest.fixture
def synthetic_shakespeare(monkeypatch: pytest.MonkeyPatch) -> list[Role]:
    """The registry's 'shakespeare' reading three synthetic roles (no package needed)."""
    roles = [role("A", filler(400, 7)), role("B", filler(1000, 8)), role("C", filler(700, 9))]
    spec = dataclasses.replace(
        registry.DATASETS["shakespeare"],
        locate=lambda options: Path("."),
        reader=lambda options: next_character_dataset(roles, options.min_text_chars),
    )
    monkeypatch.setitem(registry.DATASETS, "shakespeare", spec)
    return roles


def federation(num_clients: int, **data: object) -> FederatedData:
    raw = {"data": {"dataset": "shakespeare", "partition": "natural", "num_clients": num_clients, **data}}
    cfg = from_dict(raw)
    return build_federated_data(cfg.data, cfg.seed)


def test_federation_cuts_each_role_once_in_time(synthetic_shakespeare: list[Role]) -> None:
    data = federation(2, min_text_chars=500)  # drops A; the two clients are B (longest) then C
    assert data.num_clients == 2 and data.num_classes == 81 and data.input_shape == (80,)
    for client, source in zip(data.clients, (synthetic_shakespeare[1], synthetic_shakespeare[2]), strict=True):
        assert client.train_x.dtype == torch.int64 and client.train_y.dtype == torch.int64
        text = source.ids.astype(np.int64)
        n = text.size - SEQUENCE_LENGTH
        sizes = [client.train_y.numel(), client.val_y.numel(), client.test_y.numel()]
        # LEAF's split: the first 70% of the windows train, the next 10% validate, the last 20% test, in text order
        # (no label stratification, which would interleave windows of different characters across the cuts)
        val, test = int(0.1 * n + 0.5), int(0.2 * n + 0.5)  # rounded half up
        assert sizes == [n - val - test, val, test]
        windows = torch.cat([client.train_x, client.val_x, client.test_x])
        labels = torch.cat([client.train_y, client.val_y, client.test_y])
        assert windows.tolist() == [text[i : i + 80].tolist() for i in range(n)]
        assert labels.tolist() == text[80:].tolist()


def test_split_gap_of_80_leaves_no_character_shared_by_train_and_test(synthetic_shakespeare: list[Role]) -> None:
    data = federation(1, split_gap=SEQUENCE_LENGTH, val_fraction=0.0, train_fraction=0.8, test_fraction=0.2)
    client = data.clients[0]
    text = synthetic_shakespeare[1].ids.astype(np.int64)
    starts = {tuple(text[i : i + 80].tolist()): i for i in range(text.size - 80)}  # random text: windows unique
    last_train = starts[tuple(client.train_x[-1].tolist())]
    first_test = starts[tuple(client.test_x[0].tolist())]
    # the last training window reads characters last_train .. last_train + 80 (its label); the first test window
    # starts after them
    assert first_test - last_train == SEQUENCE_LENGTH + 1


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap runs the LSTM kernel client by client
def test_integer_inputs_train_alike_under_the_batched_executor(synthetic_shakespeare: list[Role]) -> None:
    raw = {
        "data": {"dataset": "shakespeare", "partition": "natural", "num_clients": 3, "min_text_chars": 0},
        "model": {"name": "char_lstm", "hidden_dim": 8, "feature_dim": 8},
        "train": {"rounds": 1, "batch_size": 64, "lr": 0.5, "threads": 1},
        "eval": {"generalization_samples": 60},
        "run": {"progress": False},
    }
    sequential = fedpal.run(raw).summary
    batched = fedpal.run(raw, overrides={"run.executor": "batched"}).summary
    assert sequential["personalized"]["per_client_samples"] == [int(0.2 * (n - 80) + 0.5) for n in (1000, 700, 400)]
    assert batched["personalized"]["accuracy"] == sequential["personalized"]["accuracy"]
    assert math.isclose(batched["personalized"]["loss"], sequential["personalized"]["loss"], rel_tol=1e-5)


def test_min_text_chars_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"data\.min_text_chars"):
        from_dict({"data": {"min_text_chars": -1}})
    assert from_dict({}).data.min_text_chars == DatasetOptions().min_text_chars == 1000


# --- the model


def test_char_lstm_is_leafs_network_with_the_identity_projection() -> None:
    """Embedding 8 -> two LSTM layers -> last output -> head, recomputed from the LSTM equations."""
    torch.manual_seed(0)
    hidden = 6
    model = build_model("char_lstm", (12,), NUM_SYMBOLS, feature_dim=hidden, hidden_dim=hidden, projection="pool")
    ids = torch.randint(0, NUM_SYMBOLS, (3, 12))
    p = dict(model.named_parameters())
    assert p["backbone.0.embedding.weight"].shape == (NUM_SYMBOLS, 8)
    h_seq = p["backbone.0.embedding.weight"][ids]  # [B, T, 8]
    for layer in range(2):
        w_ih, w_hh = p[f"backbone.0.lstm.weight_ih_l{layer}"], p[f"backbone.0.lstm.weight_hh_l{layer}"]
        bias = p[f"backbone.0.lstm.bias_ih_l{layer}"] + p[f"backbone.0.lstm.bias_hh_l{layer}"]
        h = torch.zeros(3, hidden)
        c = torch.zeros(3, hidden)
        outputs = []
        for t in range(12):
            i, f, g, o = (h_seq[:, t] @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        h_seq = torch.stack(outputs, dim=1)
    expected = h_seq[:, -1] @ p["head.weight"].T + p["head.bias"]
    with torch.no_grad():
        assert torch.allclose(model(ids), expected, atol=1e-5)
        assert torch.allclose(model.features(ids), h_seq[:, -1], atol=1e-5)
    assert list(model.named_buffers()) == []


def test_char_lstm_default_projection_and_shape_checks() -> None:
    model = build_model("char_lstm", (80,), NUM_SYMBOLS, feature_dim=5, hidden_dim=7)
    ids = torch.randint(0, NUM_SYMBOLS, (4, 80))
    assert model(ids).shape == (4, NUM_SYMBOLS) and model.features(ids).shape == (4, 5)
    assert (model.features(ids) >= 0).all()  # Linear + ReLU, like every fedpal backbone's linear projection
    with pytest.raises(UserError, match="char_lstm"):
        build_model("char_lstm", (1, 28, 28), 10, feature_dim=5, hidden_dim=7)


# --- the real texts (skipped without the package)


def require_texts() -> Path:
    folder = shakespeare.locate(DatasetOptions())
    if folder is None:
        pytest.skip(f"shakespeare not installed ({shakespeare.SPEC.install_command})")
    return folder


def test_the_folio_texts_give_leafs_task() -> None:
    folder = require_texts()
    roles = shakespeare.read_roles(str(folder))
    assert len({r.play for r in roles}) == 35
    assert 3.8e6 < sum(r.ids.size for r in roles) < 4.1e6  # DATA.md: 3.95 M characters
    labels = shakespeare.role_labels()
    assert 700 <= len(labels) <= 760  # roles with >= 1,000 characters (DATA.md's parse: 729)
    assert labels[0] == "hamlet/HAM"
    unknown = sum(int((r.ids == UNKNOWN_ID).sum()) for r in roles)
    assert 0 < unknown < 1e-4 * sum(r.ids.size for r in roles)  # a few "æ" and such, not a misread encoding


def test_a_short_fedavg_run_beats_chance(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    require_texts()
    config = {
        "seed": 0,
        "data": {"dataset": "shakespeare", "partition": "natural", "num_clients": 4, "max_samples": 40000},
        "model": {"name": "char_lstm", "hidden_dim": 32, "feature_dim": 32},
        "train": {"rounds": 2, "batch_size": 32, "lr": 1.0, "threads": 1},
        "eval": {"generalization_samples": 200},
        "run": {"progress": False},
        "algorithm": {"name": "fedavg"},
    }
    path = tmp_path / "shakespeare.toml"
    path.write_text(to_toml(config))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "shakespeare" and summary["rounds"] == 2
    personalized = summary["personalized"]
    assert len(personalized["per_client_samples"]) == 4
    assert personalized["accuracy"] > 1 / NUM_SYMBOLS  # guessing uniformly
    assert personalized["loss"] < math.log(NUM_SYMBOLS)  # the cross-entropy of the uniform guess
