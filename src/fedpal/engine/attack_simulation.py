"""Simulated attacks in a run (``[attack]``): which clients are malicious, their poisoned training data, and the
replies they send instead of their honest ones. The algorithms never know: data are poisoned once when the run is
assembled, and a round's replies are replaced after they arrive and before they are reduced, as a malicious client
would send them (an omniscient one for ALIE and IPM, which read the round's benign updates, as the literature
simulates them). Every draw derives from (seed, round, client), so attacked runs are reproducible like any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedpal.algorithms.core.contract import Payload, Reply
from fedpal.attacks.data_poisoning import poison_training_data
from fedpal.attacks.malicious import malicious_clients
from fedpal.attacks.reply_attacks import PrototypeAttack, ReplyAttack, attack_update, poison_prototypes
from fedpal.config import AttackConfig, ExperimentConfig
from fedpal.data.client_data import FederatedData

DATA_ATTACKS = ("label_flip", "backdoor")
PROTOTYPES = "prototypes"  # the reply key of prototype payloads: statistics per class, never a model update
UPDATE_ATTACKS = ("sign_flip", "gaussian", "scale", "alie", "ipm")


def malicious_of(config: ExperimentConfig, data: FederatedData) -> frozenset[int]:
    attack = config.attack
    if attack.type == "none":
        return frozenset()
    return malicious_clients(data.num_clients, attack.fraction, config.seed)


def with_poisoned_data(config: ExperimentConfig, data: FederatedData) -> FederatedData:
    """The federation with the malicious clients' training splits poisoned, once (a federation already poisoned,
    as a worker process receives it, is returned as it is)."""
    attack = config.attack
    if attack.type not in DATA_ATTACKS or data.poisoned:
        return data
    poisoned = poison_training_data(
        data,
        malicious_of(config, data),
        attack.type,  # type: ignore[arg-type]
        config.seed,
        fraction=attack.poison_fraction,
        target=None if attack.target < 0 else attack.target,
    )
    return dataclasses.replace(poisoned, poisoned=True)


def update_keys(reply: Reply, payload: Payload) -> list[str]:
    """The reply keys whose values update the parameter set the payload sent under the same key (prototype payloads,
    per-class statistics that a client may report only in part, are not updates even when they line up)."""
    return [k for k, v in reply.items() if k != PROTOTYPES and is_update(v, payload.get(k))]


def is_update(value: Any, reference: Any) -> bool:
    """A value with the same tensor names and shapes as ``reference``."""
    return (
        isinstance(value, dict)
        and isinstance(reference, dict)
        and bool(value)
        and value.keys() == reference.keys()
        and all(isinstance(v, torch.Tensor) and v.shape == reference[k].shape for k, v in value.items())
    )


def attacked_replies(
    attack: AttackConfig,
    malicious: frozenset[int],
    replies: dict[int, Reply],
    payloads: dict[int, Payload],
    seed: int,
    round: int,
) -> dict[int, Reply]:
    """The round's replies with each malicious client's model updates (every reply key that updates the payload's
    parameter set of the same key) or prototypes replaced by the attack's."""
    bad = sorted(set(replies) & malicious)
    if attack.type in ("none", *DATA_ATTACKS) or not bad:
        return replies
    benign = [cid for cid in sorted(replies) if cid not in malicious]
    out = dict(replies)
    for cid in bad:
        reply = dict(replies[cid])
        if attack.type == "proto_poison":
            if PROTOTYPES in reply:
                reply[PROTOTYPES] = poison_prototypes(
                    PrototypeAttack(attack.prototype_mode),
                    reply[PROTOTYPES],
                    [replies[b][PROTOTYPES] for b in benign if PROTOTYPES in replies[b]],
                    seed=seed,
                    round=round,
                    client=cid,
                )
        else:
            settings = ReplyAttack(
                attack.type,  # type: ignore[arg-type]
                sigma=attack.sigma,
                gamma=attack.gamma or None,
                epsilon=attack.epsilon,
            )
            for key in update_keys(reply, payloads[cid]):
                reply[key] = attack_update(
                    settings,
                    reply[key],
                    payloads[cid][key],
                    benign=[replies[b][key] for b in benign],
                    num_clients=len(replies),
                    num_malicious=len(bad),
                    seed=seed,
                    round=round,
                    client=cid,
                )
        out[cid] = reply
    return out
