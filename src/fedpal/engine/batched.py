"""The client-batched executor: a round's clients of one architecture trained together (``fit_together``), while
every method's own client code runs unchanged.

Each client's task runs in a thread of its own, but only one runs at a time (the executor hands a baton from client
to client in id order), so a method's code around its training (collecting features, fine-tuning, building its
reply) runs exactly as it does sequentially. When a client asks its trainer for a plain pass, it hands the request
to the executor and waits; once every client is waiting or done, the executor trains all waiting requests of one
architecture and options in one batched pass, then lets each client continue in id order. A pass with a
``FunctionalTerm`` is batched with the passes whose term has the same function (their context tensors stacked). A
request the batched pass cannot run (any other extra loss, forward options, its own optimizer, chosen trainable
parameters, a model with buffers or dropout) runs on its own, at once, as the sequential executor would.

Evaluation is batched the same way for every method: the eval-mode passes of all clients' personalized models
(their own splits, and the generalization sample they all score) run as one batched pass per architecture.
Methods declare whether their training fits this (``Algorithm.batched_training``); for the others the executor
logs one line and trains them sequentially. Results equal the sequential ones up to floating-point rounding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fedpal.algorithms.core.batched_training import (
    FitRequest,
    PredictRequest,
    fit_together,
    module_is_batchable,
    predict_together,
    term_signature,
)
from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.core.training import FitResult, FunctionalTerm, LocalTrainer
from fedpal.common.tensors import Tensors
from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import ClientResult, ClientTask, run_client_task
from fedpal.engine.sequential import SequentialExecutor

log = logging.getLogger("fedpal")


class _Baton:
    """Whose turn it is to run client code; the scheduler and the client threads pass it back and forth."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.turn: int | None = None
        self.waiting: dict[int, tuple[LocalTrainer, FitRequest | PredictRequest]] = {}
        self.results: dict[int, Any] = {}

    def wait_for_turn(self, cid: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == cid)

    def give_back(self) -> None:
        with self.condition:
            self.turn = None
            self.condition.notify_all()

    def hand_to(self, cid: int) -> None:
        """Let client ``cid`` run until it waits for a batched pass or finishes."""
        with self.condition:
            self.turn = cid
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.turn is None)

    def submit(self, cid: int, trainer: LocalTrainer, request: FitRequest | PredictRequest) -> Any:
        with self.condition:
            self.waiting[cid] = (trainer, request)
            self.turn = None
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.turn == cid)
            return self.results.pop(cid)


class _BatchingTrainer:
    """A client's trainer as the batched executor hands it out: plain passes go to the baton, the rest run here."""

    def __init__(self, trainer: LocalTrainer, baton: _Baton, cid: int) -> None:
        self._trainer = trainer
        self._baton = baton
        self._cid = cid
        self.client_steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def fit(
        self,
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        extra_loss: Any = None,
        shuffle: bool = True,
        drop_last: bool = False,
        trainable: Callable[[nn.Module], list[nn.Parameter]] | None = None,
        rng_seed: int | None = None,
        forward_options: Any = None,
        optimizer_factory: Any = None,
    ) -> FitResult:
        term = extra_loss if isinstance(extra_loss, FunctionalTerm) else None  # the one extra loss vmap can run
        plain = (extra_loss is None or term is not None) and trainable is None and optimizer_factory is None
        if plain and not forward_options and module_is_batchable(self._trainer.module):  # so rng_seed cannot matter
            request = FitRequest(params, x, y, generator, epochs, lr, shuffle, drop_last, term)
            result = self._baton.submit(self._cid, self._trainer, request)
        else:
            result = self._trainer.fit(
                params,
                x,
                y,
                generator,
                epochs=epochs,
                lr=lr,
                extra_loss=extra_loss,
                shuffle=shuffle,
                drop_last=drop_last,
                trainable=trainable,
                rng_seed=rng_seed,
                forward_options=forward_options,
                optimizer_factory=optimizer_factory,
            )
        self.client_steps += result.steps
        return result

    def predict(
        self,
        params: Tensors,
        x: torch.Tensor,
        batch_size: int | None = None,
        forward_options: Any = None,
    ) -> torch.Tensor:
        if forward_options or batch_size is not None or not module_is_batchable(self._trainer.module):
            return self._trainer.predict(params, x, batch_size, forward_options)
        logits: torch.Tensor = self._baton.submit(self._cid, self._trainer, PredictRequest(params, x))
        return logits

    def features_and_logits(
        self,
        params: Tensors,
        x: torch.Tensor,
        batch_size: int | None = None,
        forward_options: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if forward_options or batch_size is not None or not module_is_batchable(self._trainer.module):
            return self._trainer.features_and_logits(params, x, batch_size, forward_options)
        pair: tuple[torch.Tensor, torch.Tensor] = self._baton.submit(
            self._cid, self._trainer, PredictRequest(params, x, split=True)
        )
        return pair


class BatchedExecutor:
    def __init__(self, assembly: Assembly) -> None:
        self.assembly = assembly
        self.sequential = SequentialExecutor(assembly)
        self.supported = assembly.algorithm.batched_training
        if not self.supported:
            log.info(
                "run.executor = batched: '%s' does not declare batched training; its clients run sequentially",
                assembly.algorithm.name,
            )

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        """All at once: the clients of a round advance together."""
        yield from self.run(tasks).items()

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        # Evaluation batches for every method (eval-mode passes); training only for methods that declare it.
        batchable = self.supported or all(task.op == "evaluate" for task in tasks)
        if not batchable or len(tasks) < 2 or any(task.op == "score" for task in tasks):
            return self.sequential.run(tasks)
        baton = _Baton()
        results: dict[int, ClientResult] = {}
        errors: dict[int, BaseException] = {}
        trainers: dict[int, _BatchingTrainer] = {}

        def wrap(view: ClientView) -> ClientView:
            trainers[view.id] = _BatchingTrainer(view.trainer, baton, view.id)
            view.trainer = trainers[view.id]  # type: ignore[assignment]
            return view

        def body(task: ClientTask) -> None:
            baton.wait_for_turn(task.client)
            try:
                result = run_client_task(self.assembly, task, wrap)
                result.steps = trainers[task.client].client_steps
                results[task.client] = result
            except BaseException as exc:  # raised in the caller's thread below
                errors[task.client] = exc
            finally:
                baton.give_back()

        threads = [threading.Thread(target=body, args=(task,), daemon=True) for task in tasks]
        for thread in threads:
            thread.start()
        runnable = sorted(task.client for task in tasks)
        while runnable:
            for cid in runnable:
                baton.hand_to(cid)
            groups: dict[tuple[Any, ...], list[int]] = {}
            for cid, (trainer, request) in sorted(baton.waiting.items()):
                if isinstance(request, FitRequest):
                    key: tuple[Any, ...] = ("fit", id(trainer), request.epochs, request.lr, request.shuffle)
                    key += (request.drop_last, term_signature(request.term))
                else:
                    key = ("predict", id(trainer), request.split, request.x.shape[1:])
                groups.setdefault(key, []).append(cid)
            for key, cids in groups.items():
                trainer = baton.waiting[cids[0]][0]
                requests = [baton.waiting[cid][1] for cid in cids]
                if key[0] == "fit":
                    outputs: list[Any] = fit_together(trainer, requests)  # type: ignore[arg-type]
                else:
                    outputs = predict_together(trainer, requests)  # type: ignore[arg-type]
                baton.results.update(zip(cids, outputs, strict=True))
            runnable = sorted(baton.waiting)
            baton.waiting.clear()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        """Nothing to release."""
