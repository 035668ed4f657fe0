"""The backdoor's success (``attack.type = "backdoor"``): each benign client's personalized model on its own
test samples that are not of the target class, with the trigger stamped on; the share predicted as the target.

Clean accuracy is the protocol's; this is the other half of a backdoor's story (a model can keep its accuracy and
obey the trigger). It reads the clients' states where the round driver holds them, so on the Flower engine, whose
states stay on the nodes, it is not measured (said in the metrics)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload
from fedpal.attacks.data_poisoning import TriggeredTestSet, attack_success_rate
from fedpal.evaluation.client_side import host_tensors


def backdoor_success(
    algorithm: Algorithm,
    view: Callable[[int], ClientView],
    states: Mapping[int, ClientState],
    payloads: Mapping[int, Payload],
    triggered: TriggeredTestSet,
    target: int,
) -> dict[str, object]:
    """Attack success rate over the benign clients' triggered samples (sample-weighted), and its mean over clients."""
    primary = algorithm.inference_modes()[0]
    hits, totals, rates = 0.0, 0, []
    for cid in sorted(set(triggered.owner.tolist())):
        x = triggered.of_client(cid)
        client = view(cid)
        params = algorithm.personalized_params(client, states[cid], payloads[cid])
        (scores,) = host_tensors([algorithm.predict_scores(client, states[cid], payloads[cid], params, x)[primary]])
        rate = attack_success_rate(scores.argmax(dim=1), target)
        hits += rate * x.shape[0]
        totals += x.shape[0]
        rates.append(rate)
    return {
        "attack_success_rate": hits / totals if totals else float("nan"),
        "attack_success_rate_unweighted": float(np.mean(rates)) if rates else float("nan"),
        "triggered_samples": totals,
        "target": target,
    }
