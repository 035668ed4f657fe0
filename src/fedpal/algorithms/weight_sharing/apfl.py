"""APFL (Deng, Kamani and Mahdavi, 2020, "Adaptive Personalized Federated Learning"): each client trains its copy
w_i of the global model and a local model v_i side by side, and mixes them into its personalized model
v_bar_i = alpha_i v_i + (1 - alpha_i) w_i with a mixing weight alpha_i it learns by gradient descent.

Every step, on one batch (the paper's simultaneous updates, all gradients at the step's start):

- w_i <- w_i - lr * grad f_i(w_i);
- v_i <- v_i - lr * alpha_i * grad f_i(v_bar_i)   (the gradient of f_i(v_bar_i) with respect to v_i);
- alpha_i <- clip_[0, 1](alpha_i - lr_alpha * <v_i - w_i, grad f_i(v_bar_i)>)   (d f_i(v_bar_i) / d alpha_i).

The mixture's gradients come from autograd through one functional forward of the shared module at
alpha v + (1 - alpha) w.detach(), so they are exact; w_i's own loss is a second, ordinary forward. The client uploads
w_i; the server averages the uploads through the engine's ``reduce`` (uniformly, as the authors' FedTorch code does;
``weighting = "samples"`` for PFLlib's sample weights). v_i and alpha_i never leave the client; w_i restarts from
the global model every round.

The personalized model is alpha_i v_i + (1 - alpha_i) w with w the latest global model (``mix_with = "global"``)
or the client's own w_i after its latest local training (``"local"``). ``mixture = "outputs"`` mixes the two
models' logits instead of their parameters (the authors' FedTorch code); ``variant = "pfllib"`` reproduces PFLlib's
client (v_i on its own loss, a surrogate alpha gradient plus 0.02 alpha, v_i overwritten by the mixture after each
round). ``docs/methods/apfl_fedamp.md`` lists every choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.global_model import GlobalModelServer
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import clip_gradients, seeded_stochastic_layers, train_steps
from fedpal.common.tensors import Tensors
from fedpal.errors import UserError

PFLLIB_ALPHA_DECAY = 0.02  # PFLlib (and FedTorch's alpha_update) add 0.02 * alpha to the alpha gradient
MIXTURE_ALPHA = "mixture_alpha"  # marks a personalized "model" that mixes two models' outputs
GLOBAL_PREFIX = "global:"  # the second model's tensors inside such a personalized model


@dataclass(frozen=True)
class APFLHyperparameters:
    alpha: float = 0.5  # alpha_i at the start (FedTorch default and README; FedRep's baseline 0.75, PFLlib 1.0)
    alpha_lr_scale: float = 1.0  # lr of alpha = this times the local lr (FedTorch, PFLlib: 1); 0 keeps alpha fixed
    mixture: Literal["parameters", "outputs"] = "parameters"  # outputs: alpha v(x) + (1 - alpha) w(x) (FedTorch)
    mix_with: Literal["global", "local"] = "global"  # w of the personalized model: latest global, or own trained w_i
    weighting: Literal["uniform", "samples"] = "uniform"  # server mean of the w_i (samples: PFLlib)
    variant: Literal["paper", "pfllib"] = "paper"  # pfllib: v on its own loss, surrogate alpha step, v <- mixture


@dataclass
class APFLPass:
    """What one local pass of APFL leaves behind."""

    w: Tensors  # the client's trained copy of the global model (the whole state, buffers included)
    v: Tensors  # its local model (trainable parameters only)
    alpha: torch.Tensor  # 0-d
    steps: int


def mix(v: Tensors, w: Tensors, alpha: torch.Tensor) -> Tensors:
    """alpha * v + (1 - alpha) * w for the tensors of ``v``; the rest of ``w`` (buffers) as it is."""
    with torch.no_grad():
        return {**w, **{k: alpha * v[k] + (1 - alpha) * w[k] for k in v}}


def apfl_pass(
    client: ClientView,
    w_start: Tensors,
    v_start: Tensors,
    alpha_start: torch.Tensor,
    *,
    alpha_lr: float,
    mixture: str = "parameters",
    variant: str = "paper",
    purpose: str = "train",
) -> APFLPass:
    """One local pass: the run's epochs over the client's training split in the run's batches, each step updating
    w, v (the run's optimizer, one instance over both) and alpha (projected SGD at ``alpha_lr``)."""
    trainer = client.trainer
    module = trainer.module
    x, y = client.train_x, client.train_y
    with seeded_stochastic_layers(client.stochastic_seed(purpose), x.device):
        trainer.load(w_start)
        module.train()
        w_params = dict(module.named_parameters())
        v: Tensors = {name: v_start[name].detach().clone().requires_grad_(True) for name in w_params}
        # one optimizer over w (the module's parameters) and v (leaf tensors on the client's device)
        optimizer = trainer.make_optimizer(parameters=[*w_params.values(), *cast(list[nn.Parameter], list(v.values()))])
        alpha = alpha_start.detach().clone()
        step: dict[str, torch.Tensor] = {}  # this step's alpha leaf, for its gradient

        def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
            xb, yb = x[idx], y[idx]
            logits_w = module(xb)
            loss_w = F.cross_entropy(logits_w, yb)
            if variant == "pfllib":  # v on its own loss
                return loss_w + F.cross_entropy(functional_call(module, v, (xb,)), yb)
            a = alpha.clone().requires_grad_(True)
            step["alpha"] = a
            if mixture == "outputs":
                logits_mix = a * functional_call(module, v, (xb,)) + (1 - a) * logits_w.detach()
            else:
                mixed = {name: a * v[name] + (1 - a) * p.detach() for name, p in w_params.items()}
                logits_mix = functional_call(module, mixed, (xb,))
            # w's loss depends on w only, the mixture's on v and alpha only: one backward gives every gradient
            return loss_w + F.cross_entropy(logits_mix, yb)

        def update(loss: torch.Tensor) -> None:
            loss.backward()
            clip_gradients([optimizer], trainer.settings.grad_clip)  # train.grad_clip: w and v, one optimizer
            if variant == "pfllib":
                optimizer.step()
                with torch.no_grad():  # PFLlib: after both steps, from the new parameters and the step's gradients
                    g = PFLLIB_ALPHA_DECAY * alpha
                    for name, p in w_params.items():
                        gv, gw = v[name].grad, p.grad
                        if gv is not None and gw is not None:
                            g = g + ((v[name] - p) * (alpha * gv + (1 - alpha) * gw)).sum()
                    alpha.sub_(alpha_lr * g).clamp_(0.0, 1.0)
                return
            optimizer.step()
            grad = step["alpha"].grad
            if alpha_lr > 0 and grad is not None:
                alpha.sub_(alpha_lr * grad).clamp_(0.0, 1.0)

        batches = trainer.batches(x.shape[0], client.generator(purpose), device=x.device)
        result = train_steps(batches, loss_of, [optimizer], update=update)
        trainer.steps += result.steps
        w_end = trainer.snapshot()
        v_end = {name: t.detach().clone() for name, t in v.items()}
        if variant == "pfllib":  # PFLlib stores the mixture as the next round's v
            v_end = {name: alpha * v_end[name] + (1 - alpha) * w_end[name] for name in v_end}
        return APFLPass(w_end, v_end, alpha, result.steps)


@register_algorithm
class APFL(GlobalModelServer):
    name = "apfl"
    streamed_reply = ("params", None)
    description = "learned per-client mixture of a local and the global model (Deng, Kamani and Mahdavi, 2020)"
    Hyperparameters: ClassVar[type] = APFLHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if not 0.0 <= hp.alpha <= 1.0:
            raise UserError(f"algorithm.alpha must lie in [0, 1], got {hp.alpha}")
        if hp.alpha_lr_scale < 0:
            raise UserError(f"algorithm.alpha_lr_scale must be >= 0, got {hp.alpha_lr_scale}")
        if hp.variant == "pfllib" and hp.mixture == "outputs":
            raise UserError("algorithm.variant = 'pfllib' mixes parameters: use mixture = 'parameters'")

    # ---- server (the rest is GlobalModelServer's)
    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        if self.hp.mix_with == "local":
            return {cid: {} for cid in client_ids}
        return {cid: {"params": state["params"]} for cid in client_ids}

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        start = client.own_initial_params()
        names = [name for name, _ in client.trainer.module.named_parameters()]
        state: ClientState = {
            "v": {name: start[name] for name in names},
            "alpha": torch.full((), self.hp.alpha, dtype=torch.float32, device=client.device),
        }
        if self.hp.mix_with == "local":
            state["w"] = start
        return state

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = apfl_pass(
            client,
            payload["params"],
            state["v"],
            state["alpha"],
            alpha_lr=self.hp.alpha_lr_scale * client.settings.lr,
            mixture=self.hp.mixture,
            variant=self.hp.variant,
        )
        new_state: ClientState = {"v": result.v, "alpha": result.alpha}
        if self.hp.mix_with == "local":
            new_state["w"] = result.w
        return new_state, {"params": result.w, "num_samples": client.num_train}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        w = state["w"] if self.hp.mix_with == "local" else payload["params"]
        if self.hp.variant == "pfllib":  # v already is the mixture
            return {**w, **state["v"]}
        if self.hp.mixture == "outputs":  # both models and alpha: predict_scores mixes their logits
            v_model = {**w, **state["v"]}
            return {**v_model, **{GLOBAL_PREFIX + k: t for k, t in w.items()}, MIXTURE_ALPHA: state["alpha"]}
        return mix(state["v"], w, state["alpha"])

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if MIXTURE_ALPHA not in params:  # one parameter set (the global model, or a parameter mixture)
            return super().predict_scores(client, state, payload, params, x)
        alpha = params[MIXTURE_ALPHA]
        w = {k.removeprefix(GLOBAL_PREFIX): t for k, t in params.items() if k.startswith(GLOBAL_PREFIX)}
        v = {k: t for k, t in params.items() if k != MIXTURE_ALPHA and not k.startswith(GLOBAL_PREFIX)}
        scores_v = client.trainer.predict(v, x)
        scores_w = client.trainer.predict(w, x)
        return {"model": alpha * scores_v + (1 - alpha) * scores_w}

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        return {"alpha": float(state["alpha"])}
