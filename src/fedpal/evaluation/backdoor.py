"""The backdoor's success (``attack.type = "backdoor"``): each benign client's personalized model on its own
test samples that are not of the target class, with the trigger stamped on; the share predicted as the target.

Clean accuracy is the protocol's; this is the other half of a backdoor's story (a model can keep its accuracy and
obey the trigger). A client counts its own hits where its state is (``client_backdoor_hits``): in the round driver
on the simulator, on its node on the Flower engine, where the count travels in the client's evaluation report. The
run's figures are the sums over the benign clients (``backdoor_summary``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload
from fedpal.attacks.data_poisoning import default_target, trigger_for, triggered_inputs
from fedpal.config import AttackConfig
from fedpal.data.client_data import FederatedData
from fedpal.evaluation.client_side import host_tensors


def backdoor_target(attack: AttackConfig, num_classes: int) -> int:
    """The configured target class, or the default (C − 1)."""
    return attack.target if attack.target >= 0 else default_target(num_classes)


def client_backdoor_hits(
    algorithm: Algorithm, client: ClientView, state: ClientState, payload: Payload, data: FederatedData, target: int
) -> tuple[int, int]:
    """(triggered samples predicted as ``target``, triggered samples) for one client's personalized model."""
    x = triggered_inputs(data.client(client.id), trigger_for(data), target)
    if x.shape[0] == 0:
        return 0, 0
    primary = algorithm.inference_modes()[0]
    params = algorithm.personalized_params(client, state, payload)
    (scores,) = host_tensors([algorithm.predict_scores(client, state, payload, params, x)[primary]])
    return int((scores.argmax(dim=1) == target).sum()), int(x.shape[0])


def backdoor_summary(counts: Mapping[int, tuple[int, int]], target: int) -> dict[str, object]:
    """The attack success rate over the benign clients' triggered samples (sample-weighted), its mean over clients
    with such samples, and the number of samples, from each client's (hits, samples)."""
    hits = sum(h for h, _ in counts.values())
    totals = sum(n for _, n in counts.values())
    rates = [h / n for h, n in counts.values() if n]
    return {
        "attack_success_rate": hits / totals if totals else float("nan"),
        "attack_success_rate_unweighted": float(np.mean(rates)) if rates else float("nan"),
        "triggered_samples": totals,
        "target": target,
    }


def backdoor_success(
    algorithm: Algorithm,
    view: Callable[[int], ClientView],
    states: Mapping[int, ClientState],
    payloads: Mapping[int, Payload],
    data: FederatedData,
    malicious: Collection[int],
    target: int,
) -> dict[str, object]:
    """``backdoor_summary`` over the benign training clients, their states held here."""
    counts = {
        cid: client_backdoor_hits(algorithm, view(cid), states[cid], payloads[cid], data, target)
        for cid in range(data.num_clients)
        if cid not in malicious
    }
    return backdoor_summary(counts, target)
