"""What FedMosaic and the adapter baselines it is measured against share.

The model carries dual adapters on a frozen mosaic trunk (``model.adapters = true``), in the method's
``adapter_layout``: Co-LoRA in the block-end layers for FedMosaic, ordinary LoRA in every layer for the baselines (the
official code's plain LoRA and DualLoRA). Only the local adapter (lora2) and the gate train. A client keeps its lora2,
its gate, the lora1 it last loaded and its AdamW state (the official code saves and reloads the optimiser across
rounds). Local training is a fixed number of AdamW steps (``local_steps``) on mini-batches of the run's batch size drawn
from the client's training view of the round, which for a task stream is its replay store of everything seen so far; so
every adapter method takes the same number of steps on the same data (the spec's compute matching). Two learning-rate
groups: Co-LoRA P, Q (``lr_pq``) and LoRA A, B (``lr_ab``); the gate joins the A/B group as the official code does
(``lr_gate = "pq"``: the README's intent). Gradients are clipped to norm 1 (the Hugging Face trainer's default).

A client's personalized model is its saved state run in the method's mixing mode with a deterministic gate: gated (lora1
and lora2) for FedMosaic, the even mix of both for FedDPA, lora2 alone for the single-adapter baselines.

Mini-batches are drawn uniformly (fresh permutations of the store) by default; with ``data.task_replay = "priority"``
the round's batches come from the official count-based sampler (``fedpal.data.replay_priority``), drawn once per
round, shared by a method's passes (FedDPA's two phases split them, Ditto's two models see the same ones, as the
official single trainer does), with the use counts kept in the client's state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.contract import Algorithm, AlgorithmSetup, ClientState, ClientView, Payload
from fedpal.algorithms.core.training import batch_stream, seeded_stochastic_layers, train_steps
from fedpal.common.tensors import Tensors
from fedpal.data.replay_priority import priority_batches
from fedpal.errors import ConfigError
from fedpal.models.adapters import (
    AdapterPart,
    Mixing,
    adapter_parameter_names,
    set_adapter_mixing,
    trainable_groups,
)

ADAM_SLOTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True)
class AdapterHyperparameters:
    local_steps: int = 40  # AdamW steps per round on the replay store (spec CPU scale: 40 steps, batch 16)
    lr_pq: float = 2.5e-3  # Co-LoRA P, Q (authors 5e-5 with LLMs; CPU scale 2.5e-3)
    lr_ab: float = 1e-3  # LoRA A, B (authors 2e-5; CPU scale 1e-3)
    lr_gate: Literal["ab", "pq"] = "ab"  # the gate's group: "ab" as coded, "pq" as the README intends
    clip: float = 1.0  # gradient-norm clip of each step (Hugging Face default); 0 = none


@dataclass
class AdapterPass:
    """What one local pass leaves: the trained parts, the AdamW state and the batches it took."""

    lora2: Tensors
    gate: Tensors
    adam: Tensors
    batches: list[torch.Tensor]


ExtraAdapterLoss = Callable[[Mapping[str, nn.Parameter]], torch.Tensor]  # lora2 parameters by flat key -> a term


class AdapterMethod(Algorithm):
    """The shared client side of the adapter methods; subclasses decide what lora1 is and what travels."""

    supports_heterogeneous_models = True
    requires_adapters = True
    mixing: ClassVar[Mixing] = "gated"

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.local_steps < 0 or hp.lr_pq <= 0 or hp.lr_ab <= 0 or hp.clip < 0:
            raise ConfigError("algorithm.local_steps and algorithm.clip must be >= 0, lr_pq and lr_ab > 0")
        super().__init__(hp, setup)
        self._names: dict[str, dict[AdapterPart, dict[str, str]]] = {}

    # ---- the adapters as flat dicts and as the model's tensors
    def names(self, client: ClientView) -> dict[AdapterPart, dict[str, str]]:
        """Flat adapter key -> the module's parameter name, per part, for the client's architecture."""
        if client.architecture not in self._names:
            module = client.trainer.module
            self._names[client.architecture] = {
                part: adapter_parameter_names(module, part) for part in ("lora1", "lora2", "gate")
            }
        return self._names[client.architecture]

    def initial_part(self, client: ClientView, part: AdapterPart) -> Tensors:
        """The architecture's initial tensors of one adapter part (every client of it starts the same)."""
        assert client.initial_params is not None
        return {key: client.initial_params[name].detach().clone() for key, name in self.names(client)[part].items()}

    def full_params(self, client: ClientView, parts: Mapping[AdapterPart, Tensors]) -> Tensors:
        """The architecture's initial tensors with the given adapter parts in place."""
        assert client.initial_params is not None
        names = self.names(client)
        params = dict(client.initial_params)
        for part, tensors in parts.items():
            for key, tensor in tensors.items():
                params[names[part][key]] = tensor
        return params

    # ---- the local pass
    def train_adapters(
        self,
        client: ClientView,
        parts: Mapping[AdapterPart, Tensors],
        adam: Tensors,
        *,
        extra_loss: ExtraAdapterLoss | None = None,
        purpose: str = "train",
        mixing: Mixing | None = None,
        steps: int | None = None,
        batches: list[torch.Tensor] | None = None,
    ) -> AdapterPass:
        """``steps`` (default ``local_steps``) AdamW steps of cross-entropy (plus ``extra_loss``) on the client's
        training view in ``mixing`` (default the method's), from the given adapter parts and AdamW state; returns
        the trained lora2 and gate and the new AdamW state. A gate that takes no part gets no gradient, no step.
        ``batches`` (the round's priority draws, see ``replay_batches``) replace the pass's own uniform draws."""
        trainer, x, y = client.trainer, client.train_x, client.train_y
        module = trainer.module
        names = self.names(client)
        by_name = dict(module.named_parameters())
        lora2 = {key: by_name[name] for key, name in names["lora2"].items()}
        gate = {key: by_name[name] for key, name in names["gate"].items()}
        groups = trainable_groups(module)
        gate_lr = self.hp.lr_ab if self.hp.lr_gate == "ab" else self.hp.lr_pq
        param_groups = [
            {"params": groups["pq"], "lr": self.hp.lr_pq},
            {"params": groups["ab"], "lr": self.hp.lr_ab},
            {"params": groups["gate"], "lr": gate_lr},
        ]
        optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]], weight_decay=0.0)
        keys = {id(p): f"lora2.{k}" for k, p in lora2.items()} | {id(p): f"gate.{k}" for k, p in gate.items()}
        restore_adam(optimizer, adam, keys)
        set_adapter_mixing(module, mixing or self.mixing)
        if batches is None:
            count = self.hp.local_steps if steps is None else steps
            drawn = list(batch_stream(trainer, client.num_train, client.generator(purpose), count, x.device))
        else:
            drawn = [(0, idx.to(x.device)) for idx in batches]
        trained = [p for group in groups.values() for p in group]
        clip = [(trained, self.hp.clip)] if self.hp.clip > 0 else []
        with seeded_stochastic_layers(client.stochastic_seed(purpose), x.device):
            trainer.load(self.full_params(client, parts))
            module.train()

            def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
                loss = F.cross_entropy(module(x[idx]), y[idx])
                return loss if extra_loss is None else loss + extra_loss(lora2)

            result = train_steps(drawn, loss_of, [optimizer], clip=clip, grad_clip=trainer.settings.grad_clip)
        trainer.steps += result.steps
        return AdapterPass(
            {k: p.detach().clone() for k, p in lora2.items()},
            {k: p.detach().clone() for k, p in gate.items()},
            save_adam(optimizer, keys),
            [idx for _, idx in drawn],
        )

    def replay_batches(self, client: ClientView, state: ClientState) -> tuple[list[torch.Tensor] | None, ClientState]:
        """The round's ``local_steps`` batches from the official priority sampler and the state entry that keeps the
        use counts (``data.task_replay = "priority"``); ``(None, {})`` when each pass draws its own uniform batches."""
        if self.setup.task_replay != "priority":
            return None, {}
        # the counts and the draws stay on the CPU (as every batch order does); the indices move in train_adapters
        counts = state.get("replay_counts", torch.zeros(0, dtype=torch.float64, device="cpu"))
        batch_size = client.trainer.settings.batch_size
        generator = client.generator("replay")
        batches, counts = priority_batches(counts, client.num_train, self.hp.local_steps, batch_size, generator)
        return batches, {"replay_counts": counts}

    # ---- evaluation: the saved state in the method's mixing mode
    def evaluated_parts(self, client: ClientView, state: ClientState, payload: Payload) -> dict[AdapterPart, Tensors]:
        """The adapter parts of the personalized model (subclasses: which lora2, whether lora1 and the gate)."""
        parts: dict[AdapterPart, Tensors] = {"lora2": state["lora2"]}
        if self.mixing == "gated":
            parts |= {"lora1": state["lora1"], "gate": state["gate"]}
        return parts

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        set_adapter_mixing(client.trainer.module, self.mixing)
        return self.full_params(client, self.evaluated_parts(client, state, payload))


def save_adam(optimizer: torch.optim.Optimizer, keys: Mapping[int, str]) -> Tensors:
    """AdamW's per-parameter state as flat tensors named ``{part}.{key}.{slot}`` (a client state holds tensors)."""
    saved: Tensors = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            slots = optimizer.state.get(parameter)
            if not slots:
                continue
            for slot in ADAM_SLOTS:
                value = slots[slot]
                saved[f"{keys[id(parameter)]}.{slot}"] = (
                    value.detach().clone()
                    if torch.is_tensor(value)
                    else torch.tensor(float(value), device=parameter.device)
                )
    return saved


def restore_adam(optimizer: torch.optim.Optimizer, saved: Tensors, keys: Mapping[int, str]) -> None:
    """Put a saved AdamW state back on the parameters it belongs to (none saved: a fresh optimiser)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            prefix = keys[id(parameter)]
            if f"{prefix}.step" in saved:
                optimizer.state[parameter] = {slot: saved[f"{prefix}.{slot}"].clone() for slot in ADAM_SLOTS}
