"""The round driver: the one loop every engine runs. It samples clients, asks the server for payloads, hands
client work to an executor, checks and counts every message, reduces replies through the engine's one reduction
point, evaluates on a schedule, writes metrics and checkpoints. It never knows an algorithm by name, and it never
runs client code itself: executors do.

All randomness is derived from (seed, round, client id, purpose), so a run is reproducible bit for bit, does not
depend on the order in which clients run, and a resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpal.algorithms.core.contract import ClientState, Payload, Reply, ServerState
from fedpal.attacks.unreliable import RoundFate, Unreliability, available_clients, round_fate
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors
from fedpal.config import AvailabilityConfig, ExperimentConfig
from fedpal.engine.assembly import Assembly
from fedpal.engine.attack_simulation import DATA_ATTACKS, attacked_replies, malicious_of
from fedpal.engine.executor import ClientResult, ClientTask, Executor, in_id_order
from fedpal.engine.messages import message_bytes, reply_problem
from fedpal.engine.private_reduction import PrivacyRun, PrivateReducer
from fedpal.engine.progress import Progress
from fedpal.engine.reduction import build_reducer
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.sequential import SequentialExecutor
from fedpal.engine.streamed_reduction import ReplyFold
from fedpal.engine.summary import build_summary
from fedpal.errors import UserError
from fedpal.evaluation.backdoor import backdoor_success, backdoor_summary, backdoor_target
from fedpal.evaluation.client_report import ClientReport
from fedpal.evaluation.evaluator import Evaluator, Scorer

log = logging.getLogger("fedpal")


@dataclass
class Counters:
    """Running totals that a checkpoint must restore for a resumed run to match."""

    up_by_key: dict[str, int] = field(default_factory=dict)
    down_by_key: dict[str, int] = field(default_factory=dict)
    # what clients receive to evaluate (configure_evaluation), kept apart from training traffic
    evaluation_down_by_key: dict[str, int] = field(default_factory=dict)
    rejected_replies: int = 0
    rejected_clients: list[int] = field(default_factory=list)  # sorted ids of clients with a refused reply
    client_failures: int = 0  # client tasks that came back without a result (a node lost, a timeout)
    # [availability]: replies lost after training, replies past the round deadline, virtual seconds elapsed
    lost_replies: int = 0
    late_replies: int = 0
    virtual_seconds: float = 0.0
    local_steps: int = 0
    wall_seconds: float = 0.0

    def add(self, direction: str, by_key: dict[str, int]) -> None:
        tables = {"up": self.up_by_key, "down": self.down_by_key, "evaluation_down": self.evaluation_down_by_key}
        table = tables[direction]
        for key, n in by_key.items():
            table[key] = table.get(key, 0) + n

    def as_bytes(self) -> dict[str, Any]:
        return {
            "up": sum(self.up_by_key.values()),
            "down": sum(self.down_by_key.values()),
            "up_by_key": dict(self.up_by_key),
            "down_by_key": dict(self.down_by_key),
            "evaluation_down": sum(self.evaluation_down_by_key.values()),
        }


def sample_clients(
    config: ExperimentConfig, num_clients: int, round: int, available: list[int] | None = None
) -> list[int]:
    """The round's clients: ``train.clients_per_round`` (or the fraction) of all clients, or of the ``available``
    ones when clients are unreliable (``[availability]``)."""
    t = config.train
    count = t.clients_per_round if t.clients_per_round > 0 else max(1, round_half_up(t.client_fraction * num_clients))
    if available is not None:
        count = min(count, len(available))
        rng = np.random.default_rng(derive_seed(config.seed, round, "client-sampling"))
        return sorted(int(available[i]) for i in rng.choice(len(available), size=count, replace=False))
    count = min(count, num_clients)
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(config.seed, round, "client-sampling"))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def unreliability(settings: AvailabilityConfig) -> Unreliability:
    return Unreliability(
        settings.p_available,
        settings.p_drop,
        settings.latency_mu,
        settings.latency_sigma,
        settings.deadline if settings.deadline > 0 else math.inf,
    )


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def mean_client_diagnostics(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean over clients of each client diagnostic, NaN values left out (a key with no finite value is dropped)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for d in per_client for k in d):
        finite = [d[key] for d in per_client if key in d and d[key] == d[key]]
        if finite:
            out[key] = sum(finite) / len(finite)
    return out


class RoundDriver:
    """Runs an assembled run's rounds through an executor (sequential by default)."""

    def __init__(
        self,
        assembly: Assembly,
        executor: Executor | None = None,
        run_dir: RunDirectory | None = None,
        progress: bool = True,
    ) -> None:
        self.assembly = assembly
        self.config = assembly.config
        self.data = assembly.data
        self.algorithm = assembly.algorithm
        self.executor: Executor = executor if executor is not None else SequentialExecutor(assembly)
        self.run_dir = run_dir
        self.privacy = (
            PrivacyRun(
                self.config.privacy, self.data.num_clients, self.config.seed, self.algorithm.reads_replies_directly
            )
            if self.config.privacy.active
            else None
        )
        self.reduce = build_reducer(self.config.aggregation) if self.privacy is None else PrivateReducer(self.privacy)
        self.malicious = malicious_of(self.config, self.data)  # [attack]: fixed for the run
        self.evaluator = Evaluator(self.data, self.config.eval, self.config.seed, self.malicious)
        config = self.config
        self.progress = Progress(config.train.rounds, config.algorithm_name, progress and config.run.progress)
        self.counters = Counters()
        self.history: list[dict[str, Any]] = []
        self.server: ServerState = {}
        self.clients: dict[int, ClientState] = {}
        self.next_round = 1

    # ---- state
    def initialize(self) -> None:
        self.server = self.algorithm.init_server()
        tasks = [ClientTask(cid, 0, "init") for cid in range(self.data.num_clients)]
        results = self.executor.run(tasks)
        self.clients = {cid: results[cid].state for cid in range(self.data.num_clients)}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.server = checkpoint["server"]
        self.clients = checkpoint["clients"]
        self.counters = Counters(**checkpoint["counters"])
        self.next_round = int(checkpoint["round"]) + 1
        self.history = list(checkpoint["history"])
        if self.privacy is not None and "privacy" in checkpoint:
            self.privacy.load_state_dict(checkpoint["privacy"])

    def checkpoint_state(self, round: int) -> dict[str, Any]:
        return {
            "round": round,
            "server": self.server,
            "clients": self.clients,
            "counters": self.counters.__dict__,
            "history": self.history,
            **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {}),
        }

    # ---- one round
    def run_round(self, round: int) -> None:
        availability = self.config.availability
        fate: RoundFate | None = None
        if availability.active:  # unreliable clients: sample among the available, then see whose reply arrives
            settings = unreliability(availability)
            available = available_clients(settings, self.config.seed, round, range(self.data.num_clients))
            if not available:
                self.note(f"round {round}: no client available; the round is skipped")
                return
            ids = sample_clients(self.config, self.data.num_clients, round, available)
            fate = round_fate(settings, self.config.seed, round, ids)
            self.counters.virtual_seconds += fate.virtual_time
        else:
            ids = sample_clients(self.config, self.data.num_clients, round)
        payloads = self.algorithm.configure(self.server, round, ids)
        for cid in ids:
            self.counters.add("down", message_bytes(payloads[cid]))
        fold = self.reply_fold()
        tasks = [ClientTask(cid, round, "fit", self.clients[cid], payloads[cid]) for cid in ids]
        replies: dict[int, Reply] = {}
        for cid, result in in_id_order(self.executor.stream(tasks), ids):  # whatever order they arrive in
            if fate is not None and cid not in fate.accepted and not self.failed(round, cid, result):
                self.lost(cid, result, late=cid in fate.late)
                continue
            reply = self.accept(round, cid, result, payloads[cid])
            if reply is not None:
                replies[cid] = reply if fold is None else fold.take(cid, reply)
        replies = attacked_replies(self.config.attack, self.malicious, replies, payloads, self.config.seed, round)
        if isinstance(self.reduce, PrivateReducer):
            self.reduce.start_round(round)
        self.server = self.algorithm.aggregate(self.server, round, replies, self.reduce)
        if self.privacy is not None:
            self.privacy.end_round(round, len(ids))  # the clients sampled: a lost or rejected reply adds 0

    def reply_fold(self) -> ReplyFold | None:
        """A running mean for the method's declared reply field, when the reducer folds (``streamed_reduction``) and
        no simulated attacker replaces replies after they arrive."""
        declared = self.algorithm.streamed_reply
        attacked = self.malicious and self.config.attack.type not in DATA_ATTACKS
        if declared is None or not getattr(self.reduce, "streams", False) or attacked:
            return None
        return ReplyFold(*declared)

    def note(self, message: str) -> None:
        log.warning(message)
        if self.run_dir is not None:
            self.run_dir.log(message)

    def failed(self, round: int, cid: int, result: ClientResult) -> bool:
        """Whether the task came back without a result; such a client is counted and left out of the round."""
        if result.failure is None:
            return False
        self.counters.client_failures += 1
        self.note(f"round {round}: client {cid} failed: {result.failure}")
        return True

    def lost(self, cid: int, result: ClientResult, late: bool) -> None:
        """A reply that never reached the server (lost after training, or past the deadline): the client trained and
        keeps its new state; nothing of it is reduced or counted as sent."""
        self.counters.local_steps += result.steps
        self.clients[cid] = result.state
        if late:
            self.counters.late_replies += 1
        else:
            self.counters.lost_replies += 1

    def accept(self, round: int, cid: int, result: ClientResult, payload: Payload) -> Reply | None:
        """Count and check one client's reply; keep its new state and return the reply, or None if rejected."""
        if self.failed(round, cid, result):
            return None
        reply = result.reply if result.reply is not None else {}
        self.counters.local_steps += result.steps
        problem = reply_problem(reply, self.algorithm.expected_reply_shapes(payload))
        # A rejected reply still travelled; one holding a non-message value has no size (reply_problem says why).
        with contextlib.suppress(TypeError):
            self.counters.add("up", message_bytes(reply))
        if problem is not None:
            self.counters.rejected_replies += 1
            if cid not in self.counters.rejected_clients:  # a diverged client: benchmarks count them per method
                self.counters.rejected_clients = sorted([*self.counters.rejected_clients, cid])
            self.note(f"round {round}: rejected reply of client {cid}: {problem}")
            return None
        self.clients[cid] = result.state
        return reply if self.privacy is None else self.privacy.clip(reply, payload)

    def evaluate(self, round: int) -> dict[str, Any]:
        ids = list(range(self.data.num_clients))
        payloads = self.algorithm.configure_evaluation(self.server, round, ids)
        for cid in ids:
            self.counters.add("evaluation_down", message_bytes(payloads[cid]))
        predictions = None
        on_nodes = getattr(self.executor, "evaluates_on_nodes", False)
        client_diagnostics: list[dict[str, float]] = []  # in client id order, as the reports arrive
        backdoor_counts: dict[int, tuple[int, int]] = {}  # on the nodes: each benign client's (hits, samples)
        if on_nodes:
            reports = self.reports(round, ids, payloads, client_diagnostics, backdoor_counts)
            metrics = self.evaluator.evaluate_reports(self.algorithm, reports, len(ids))
        elif not self.algorithm.personalized_is_global:  # each client scores its own model where it runs
            tasks = [
                ClientTask(cid, round, "evaluate", self.clients[cid], payloads[cid], self.evaluator.probe(cid))
                for cid in ids
            ]
            # scored as the evaluator consumes them: one client's scores are held at a time, not every client's
            predictions = (
                (cid, result.predictions)
                for cid, result in in_id_order(self.executor.stream(tasks), ids)
                if result.predictions is not None
            )
        if not on_nodes:
            client_diagnostics = [self.algorithm.client_diagnostics(s) for s in self.clients.values()]
            metrics = self.evaluator.evaluate(
                self.algorithm,
                self.server,
                self.clients,
                payloads,
                lambda cid: self.assembly.view(cid, round),
                predictions,
                self.scorer(round),
            )
        diagnostics = {
            **self.algorithm.server_diagnostics(self.server),
            **mean_client_diagnostics(client_diagnostics),
        }
        if diagnostics:
            metrics["diagnostics"] = diagnostics
        if self.privacy is not None:
            metrics["privacy"] = self.privacy.report()
        if self.malicious:  # the report tells benign from malicious clients
            metrics["malicious_clients"] = sorted(self.malicious)
        if self.config.attack.type == "backdoor":
            target = backdoor_target(self.config.attack, self.data.num_classes)
            metrics["backdoor"] = (
                backdoor_summary(backdoor_counts, target)
                if on_nodes
                else backdoor_success(
                    self.algorithm,
                    lambda cid: self.assembly.view(cid, round),
                    self.clients,
                    payloads,
                    self.data,
                    self.malicious,
                    target,
                )
            )
        if self.data.tasks_seen is not None:  # a task stream: which tasks each client has met by this round
            metrics["tasks_seen"] = [self.data.tasks_seen(cid, round) for cid in range(self.data.num_clients)]
        matrices = self.algorithm.server_matrices(self.server)
        if matrices:
            metrics["matrices"] = {name: m.detach().cpu().double().tolist() for name, m in matrices.items()}
            if self.data.client_groups:  # the truth the report marks on them
                metrics["client_groups"] = self.data.client_groups[: self.data.num_clients]
        return {
            "round": round,
            "wall_seconds": round_wall(self.counters.wall_seconds),
            "local_steps": self.counters.local_steps,
            "bytes": self.counters.as_bytes(),
            "rejected_replies": self.counters.rejected_replies,
            "client_failures": self.counters.client_failures,
            **metrics,
        }

    def reports(
        self,
        round: int,
        ids: list[int],
        payloads: dict[int, Payload],
        client_diagnostics: list[dict[str, float]],
        backdoor_counts: dict[int, tuple[int, int]],
    ) -> Iterator[tuple[int, ClientReport]]:
        """Each client's own evaluation report (``client_report``), for executors whose clients evaluate where their
        data live; the global model, for methods with one, goes with the tasks (to be scored as client 0 holds it).
        Each reporting client's diagnostics are appended to ``client_diagnostics``, and a benign client's backdoor
        count (a backdoor run) goes into ``backdoor_counts``."""
        global_params = None if self.algorithm.personalized_is_global else self.algorithm.global_params(self.server)
        holder = payloads[0] if global_params is not None else None
        tasks = [
            ClientTask(
                cid, round, "report", self.clients[cid], payloads[cid], params=global_params, holder_payload=holder
            )
            for cid in ids
        ]
        for cid, result in in_id_order(self.executor.stream(tasks), ids):
            if not self.failed(round, cid, result) and result.report is not None:
                client_diagnostics.append(result.report.diagnostics or {})
                if result.report.backdoor_samples is not None and result.report.backdoor_hits is not None:
                    backdoor_counts[cid] = (result.report.backdoor_hits, result.report.backdoor_samples)
                yield cid, result.report

    def scorer(self, round: int) -> Scorer:
        """Scores of one model on pooled inputs, in chunks of the evaluation batch spread over the executor: each
        chunk is exactly a batch the model would see in one process, so the scores are bit-identical."""
        chunk = self.config.eval.batch_size

        def score(params: Tensors, state: ClientState, payload: Payload, x: torch.Tensor) -> dict[str, torch.Tensor]:
            starts = list(range(0, x.shape[0], chunk))
            if len(starts) < 2:
                return self.evaluator.direct_scorer(self.algorithm, lambda c: self.assembly.view(c, round))(
                    params, state, payload, x
                )
            tasks = [
                ClientTask(i, round, "score", state, payload, x[s : s + chunk], params) for i, s in enumerate(starts)
            ]
            results = self.executor.run(tasks)
            parts = [results[i].scores for i in range(len(starts))]
            return {mode: torch.cat([part[mode] for part in parts if part is not None]) for mode in parts[0] or {}}

        return score

    def evaluate_unseen(self, round: int) -> dict[str, Any]:
        """Adapt each held-out client with the method's own ``adapt_unseen``, from the payload the final server
        state gives it, and evaluate it. Nothing here reaches the server, the training clients or the counters."""
        n = self.data.num_clients
        if getattr(self.executor, "evaluates_on_nodes", False):  # they need other clients' data
            return {"simulator_only": True, "clients": len(self.data.unseen)}
        ids = list(range(n, n + len(self.data.unseen)))
        payloads = self.algorithm.configure(self.server, round, ids)
        results = self.executor.run([ClientTask(cid, round, "adapt", None, payloads[cid]) for cid in ids])
        adapted = {cid: results[cid].state for cid in ids}
        eval_payloads = self.algorithm.configure_evaluation(self.server, round, ids)
        scored = self.executor.run(
            [ClientTask(cid, round, "evaluate", adapted[cid], eval_payloads[cid]) for cid in ids]
        )
        predictions = {cid: result.predictions for cid, result in scored.items() if result.predictions}
        metrics = self.evaluator.evaluate_unseen(
            self.algorithm, self.server, adapted, eval_payloads, lambda cid: self.assembly.view(cid, round), predictions
        )
        return {**metrics, "adaptation_steps": sum(results[cid].steps for cid in ids)}

    # ---- the loop
    def run(self) -> dict[str, Any]:
        """Run the remaining rounds and return the summary; the executor is closed at the end, however it ends."""
        try:
            return self._run()
        finally:
            self.executor.close()

    def budget_spent(self, round: int) -> bool:
        """Whether ``round`` would pass ``privacy.max_epsilon`` (the run then ends before it, and says so)."""
        if round > self.config.train.rounds or self.privacy is None:
            return False
        if not self.privacy.would_stop(len(sample_clients(self.config, self.data.num_clients, round))):
            return False
        self.note(f"round {round} would pass privacy.max_epsilon = {self.config.privacy.max_epsilon}: the run ends")
        return True

    def _run(self) -> dict[str, Any]:
        if self.next_round == 1 and not self.server and not self.clients:
            self.initialize()
        rounds = self.config.train.rounds
        every = self.config.eval.every
        ckpt_every = self.config.run.checkpoint_every
        if self.next_round == 1 and self.privacy is not None:
            cohort = len(sample_clients(self.config, self.data.num_clients, 1))
            if self.privacy.would_stop(cohort):
                raise UserError(
                    f"privacy.max_epsilon = {self.config.privacy.max_epsilon} is below the epsilon of a single round "
                    f"(z = {self.config.privacy.noise_multiplier}, {cohort} of {self.data.num_clients} clients): "
                    "raise the noise or the budget"
                )
        for r in range(self.next_round, rounds + 1):
            started = time.perf_counter()
            self.run_round(r)
            last = r == rounds or self.budget_spent(r + 1)  # the run's last round: evaluated and checkpointed
            entry = None
            if r % every == 0 or last:
                entry = self.evaluate(r)
                if last and self.data.unseen:  # before the checkpoint, so a finished run keeps it
                    entry["unseen"] = self.evaluate_unseen(r)
            self.counters.wall_seconds += time.perf_counter() - started
            if entry is not None:
                entry["wall_seconds"] = round_wall(self.counters.wall_seconds)
                self.history.append(entry)
                if self.run_dir is not None:
                    self.run_dir.append_metrics(entry)
                brief = {"acc": entry["personalized"]["accuracy"], "gen": entry["generalization"]["accuracy"]}
                self.progress.update(r, brief)
            else:
                self.progress.update(r)
            if self.run_dir is not None and ckpt_every > 0 and (r % ckpt_every == 0 or last):
                self.run_dir.save_checkpoint(self.checkpoint_state(r))
            self.next_round = r + 1
            if last:
                break
        self.progress.close()
        summary = build_summary(self.config, self.history, self.counters)
        if self.privacy is not None:
            summary["privacy"] = self.privacy.report(final=True)
        if self.run_dir is not None:
            self.run_dir.write_summary(summary)
        return summary


def round_wall(seconds: float) -> float:
    return round(seconds, 3)
