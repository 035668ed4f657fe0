"""FedALA (Zhang et al., AAAI 2023, "FedALA: Adaptive Local Aggregation for Personalized Federated Learning"):
instead of overwriting its local model with the global one, a client starts each round from

    theta_hat = theta_local + (theta_global - theta_local) * W     (element-wise, on the top ``top_tensors`` tensors)

with the lower parameter tensors taken from the global model, and learns W in [0, 1] on a random share of its own
training data (adaptive local aggregation, ALA). Then it trains theta_hat as FedAvg would and uploads the whole model;
the server takes FedAvg's sample-weighted mean.

ALA, as the authors' ``system/utils/ALA.py`` runs it: skipped while the first parameter tensors of the two models sum
to the same value (round 1, when both are the initial model); otherwise one contiguous random slice of
``sample_percent`` % of the training split, walked in order in the run's batches, and after each batch
W <- clip(W - eta * dL/dtheta_hat * (theta_global - theta_local), 0, 1) and theta_hat re-formed. The first ALA
repeats such passes until the standard deviation of the last ``loss_window`` pass losses (each pass's last batch
loss) falls below ``threshold``; later ones make one pass. W starts at 1 and is kept between rounds.

ALA's random slice and stochastic layers are drawn from a generator keyed by the version of the global model (the
round that produced it), not by the round that runs ALA: the model a client is evaluated on after a round
(``evaluate = "ala"``, what the authors' code evaluates) is then bit for bit the model it starts its next training
from. ``docs/methods/ditto_fedrep_fedbabu_fedala.md`` gives every default and where fedpal differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.global_model import GlobalModelServer
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import batch_indices, seeded_stochastic_layers, train_steps
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class FedALAHyperparameters:
    eta: float = 1.0  # eta_W: the weights' learning rate (authors' -et)
    sample_percent: float = 80.0  # s: the share of the training split ALA learns on, in % (authors' -s)
    top_tensors: int = 2  # p: parameter tensors that ALA weighs, counted from the last (authors' -p: head weight, bias)
    threshold: float = 0.1  # the first ALA stops when the std of the last loss_window pass losses is below this
    loss_window: int = 10  # losses the stopping rule looks at (authors' num_pre_loss)
    max_first_passes: int = 100  # a cap on the first ALA's passes (the authors' loop has none); 0 = no cap
    evaluate: Literal["ala", "post_local"] = "ala"  # ala: ALA on the latest global model; post_local: after training


@dataclass
class ALAResult:
    """What one adaptive local aggregation leaves behind."""

    start: Tensors  # theta_hat: the model local training starts from
    weights: Tensors  # W of the top tensors
    ran: bool  # False when skipped (the global model brought nothing new)
    passes: int  # passes over the slice that learned W


def adaptive_local_aggregation(
    client: ClientView,
    local: Tensors,
    global_params: Tensors,
    weights: Tensors,
    *,
    first: bool,
    version: int,
    hp: Any,
) -> ALAResult:
    """theta_hat from a client's local model, the global model and its weights W, learning W on a slice of its data.

    ``first``: whether this is the client's first ALA (passes until the losses settle, else one pass); ``version``:
    the round that produced ``global_params``, which keys the slice and the stochastic layers.
    """
    module = client.trainer.module
    names = [name for name, _ in module.named_parameters()]
    top = names[-hp.top_tensors :]
    if torch.sum(global_params[names[0]] - local[names[0]]) == 0:  # the authors' test for "nothing new yet"
        return ALAResult(local, weights, False, 0)
    lower = {name: global_params[name] for name in names[: -hp.top_tensors]}
    difference = {name: global_params[name] - local[name] for name in top}
    learned = {name: weights[name].clone() for name in top}

    def blend() -> Tensors:
        return {name: local[name] + difference[name] * learned[name] for name in top}

    n = client.num_train
    share = int(hp.sample_percent / 100 * n)
    passes = 0
    if share > 0 and hp.eta > 0:
        slice_rng = torch.Generator().manual_seed(derive_seed(client.seed, version, client.id, "ala-slice"))
        offset = int(torch.randint(0, n - share + 1, (), generator=slice_rng, device="cpu"))  # a host number
        x = client.train_x[offset : offset + share]
        y = client.train_y[offset : offset + share]
        # buffers (normalization statistics) stay the local model's; a copy takes the pass's running updates
        fixed = {name: t.clone() for name, t in local.items() if name not in difference and name not in lower}
        fixed.update(lower)
        current: dict[str, torch.Tensor] = {}
        losses: list[float] = []

        def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
            current.clear()
            current.update({name: t.detach().requires_grad_(True) for name, t in blend().items()})
            return F.cross_entropy(functional_call(module, {**fixed, **current}, (x[idx],)), y[idx])

        def update(loss: torch.Tensor) -> None:
            grads = torch.autograd.grad(loss, list(current.values()))
            with torch.no_grad():
                for (name, _), grad in zip(current.items(), grads, strict=True):
                    learned[name] = torch.clamp(learned[name] - hp.eta * (grad * difference[name]), 0, 1)

        seed = derive_seed(client.seed, version, client.id, "ala-layers")
        with seeded_stochastic_layers(seed, x.device):
            module.train()
            while True:
                walk = batch_indices(
                    share, client.settings.batch_size, slice_rng, epochs=1, shuffle=False, device=x.device
                )
                result = train_steps(walk, loss_of, [], update=update)
                losses.append(float(result.losses[-1]))
                passes += 1
                if not first:
                    break
                window = losses[-hp.loss_window :]
                if len(losses) > hp.loss_window and float(np.std(window)) < hp.threshold:
                    break
                if hp.max_first_passes and passes >= hp.max_first_passes:
                    break
    start = {**local, **lower, **{name: t.detach() for name, t in blend().items()}}
    return ALAResult(start, learned, True, passes)


@register_algorithm
class FedALA(GlobalModelServer):
    name = "fedala"
    streamed_reply = ("params", "num_samples")
    batched_training = True  # ALA runs beside; the local training is a plain pass
    description = "local models blended with the global one by learned element-wise weights (Zhang et al., 2023)"
    Hyperparameters: ClassVar[type] = FedALAHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.eta < 0 or hp.threshold < 0:
            raise ConfigError("algorithm.eta and algorithm.threshold must be >= 0")
        if not 0 < hp.sample_percent <= 100:
            raise ConfigError(f"algorithm.sample_percent must lie in (0, 100], got {hp.sample_percent}")
        if hp.top_tensors < 1 or hp.loss_window < 1 or hp.max_first_passes < 0:
            raise ConfigError("algorithm.top_tensors and algorithm.loss_window must be >= 1, max_first_passes >= 0")
        super().__init__(hp, setup)

    # ---- server
    def init_server(self) -> ServerState:
        return {"params": clone_tensors(self.setup.initial_params), "version": 0}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"params": state["params"], "version": state["version"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        return {"params": self.average(state, replies, reduce), "version": round}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        if self.hp.evaluate == "post_local":
            return {cid: {} for cid in client_ids}
        return self.configure(state, round, client_ids)

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        local = client.own_initial_params()
        names = [name for name, _ in client.trainer.module.named_parameters()][-self.hp.top_tensors :]
        weights = {name: torch.ones_like(local[name]) for name in names}
        return {"params": local, "weights": weights, "ala_done": False, "ala_passes": 0}

    def aggregation(self, client: ClientView, state: ClientState, payload: Payload) -> ALAResult:
        """ALA of the client's local model with the payload's global model; the first one until losses settle."""
        return adaptive_local_aggregation(
            client,
            state["params"],
            payload["params"],
            state["weights"],
            first=not state["ala_done"],
            version=int(payload["version"]),
            hp=self.hp,
        )

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        ala = self.aggregation(client, state, payload)
        result = client.fit(ala.start)
        new_state = {
            "params": result.params,
            "weights": ala.weights,
            "ala_done": state["ala_done"] or ala.ran,
            "ala_passes": ala.passes if ala.ran else state["ala_passes"],  # a skipped ALA keeps the last record
        }
        return new_state, {"params": result.params, "num_samples": client.num_train}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if self.hp.evaluate == "post_local":
            return state["params"]
        return self.aggregation(client, state, payload).start

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        """The mean aggregation weight and the passes of the latest ALA (NaN before a client's first ALA)."""
        if not state["ala_done"]:
            return {"ala_weight": float("nan"), "ala_passes": float("nan")}
        weights = torch.cat([w.reshape(-1) for w in state["weights"].values()])
        return {"ala_weight": float(weights.mean()), "ala_passes": float(state["ala_passes"])}
