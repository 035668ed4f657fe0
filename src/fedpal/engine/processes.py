"""The process executor: a round's clients spread over single-threaded worker processes, one per core.

On a CPU, the small models of PFL waste intra-op threads, and two processes with two threads each on two cores
run ~17x slower per step; N single-threaded workers are the lever. Each worker (``fedpal.engine.worker``, a fresh
Python process, so scripts and notebooks need no ``__main__`` guard) assembles the run once (its own reusable
module per architecture, built from the same seeds) from the config and the data, which it receives once through
shared memory. Every round it gets its clients' tasks (spread largest first so the workers finish together, then
taken in id order), runs the same ``run_client_task`` as the sequential executor and sends each result back as it
completes. Because every random draw derives from (seed, round, client, purpose), results are bit-identical to
sequential execution with one thread (the conformance suite checks it for every method).

Round messages travel through the worker's pipes with their tensors out of band (``transport.py``): copies, so a
state never lingers in shared memory, at the cost of the transfer alone; the data are shared once.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import IO, Any

import torch.multiprocessing as torch_multiprocessing

from fedpal.data.client_data import FederatedData
from fedpal.engine.assembly import Assembly
from fedpal.engine.device import PROCESSES_NEED_CPU
from fedpal.engine.executor import ClientResult, ClientTask
from fedpal.engine.transport import read_message, write_message
from fedpal.errors import UserError


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its exception and traceback."""


def task_cost(task: ClientTask, data: FederatedData) -> int:
    """How much work a task is, for spreading tasks evenly: the samples it passes over."""
    if task.op == "score":
        return 0 if task.probe is None else int(task.probe.shape[0])
    client = data.client(task.client)
    if task.op == "evaluate":
        return int(client.test_y.numel() + client.val_y.numel() + (0 if task.probe is None else task.probe.shape[0]))
    return int(client.train_y.numel()) + 1


def spread(tasks: list[ClientTask], costs: list[int], workers: int) -> list[list[ClientTask]]:
    """Largest first, each to the least-loaded worker (LPT): the workers of a round finish close together."""
    buckets: list[list[ClientTask]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for cost, task in sorted(zip(costs, tasks, strict=True), key=lambda pair: (-pair[0], pair[1].client)):
        i = loads.index(min(loads))
        buckets[i].append(task)
        loads[i] += cost
    return buckets


def data_bytes(data: FederatedData) -> int:
    """Bytes of the storages behind the clients' tensors (a storage several clients view is counted once)."""
    splits = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    storages = {}
    for client in [*data.clients, *data.unseen]:
        for split in splits:
            storage = getattr(client, split).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def check_shared_memory(data: FederatedData, where: str = "/dev/shm") -> None:
    """Fail with one line, before anything is moved, when the data cannot fit in shared memory."""
    try:
        stats = os.statvfs(where)
    except OSError:
        return  # no such mount: torch will say what it needs
    free = stats.f_bavail * stats.f_frsize
    needed = data_bytes(data)
    if needed > free:
        raise UserError(
            f"run.executor = 'processes' shares the data through {where}: it needs {needed / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free; enlarge it (docker: --shm-size) or use run.executor = 'sequential'"
        )


def shared_pickle(value: Any) -> bytes:
    """Pickle whose tensors travel as shared-memory handles (the data, once), not as copies."""
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


class ProcessExecutor:
    """Client work on ``workers`` single-threaded processes; see the module docstring."""

    def __init__(self, assembly: Assembly, workers: int) -> None:
        if workers < 1:
            raise ValueError("the process executor needs at least one worker")
        self.assembly = assembly
        self.processes: list[subprocess.Popen[bytes]] = []
        if assembly.config.run.device != "cpu":  # the transport and shared memory carry CPU tensors
            raise UserError(PROCESSES_NEED_CPU)
        check_shared_memory(assembly.data)
        # shared memory by file name: any process can open it, and it costs no file descriptor per tensor
        torch_multiprocessing.set_sharing_strategy("file_system")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-c", "from fedpal.engine.worker import main; main()"]
        for _ in range(workers):
            self.processes.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
        try:
            run = shared_pickle((assembly.config, assembly.data))  # a pickle inside the first message
            for process in self.processes:
                write_message(self._inbox(process), run)
            for process in self.processes:
                self._receive(process)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _inbox(process: subprocess.Popen[bytes]) -> IO[bytes]:
        assert process.stdin is not None
        return process.stdin

    def _receive(self, process: subprocess.Popen[bytes]) -> Any:
        assert process.stdout is not None
        received, message = read_message(process.stdout)
        if not received:
            raise WorkerError(f"a worker process exited unexpectedly (exit code {process.poll()})")
        status, value = message
        if status == "error":
            raise WorkerError(f"a worker process failed:\n{value}")
        return value

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        return dict(self.stream(tasks))

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        """Results as the workers finish them. Each worker takes its share in ascending client id, so results
        arrive close to the order the driver folds them in; a reader thread per worker drains its pipe, so a
        worker never waits for the driver to read."""
        costs = [task_cost(task, self.assembly.data) for task in tasks]
        buckets = spread(tasks, costs, len(self.processes))
        busy = [(process, bucket) for process, bucket in zip(self.processes, buckets, strict=True) if bucket]
        arrived: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def drain(process: subprocess.Popen[bytes], count: int) -> None:
            for _ in range(count):
                try:
                    arrived.put((True, self._receive(process)))
                except BaseException as exc:
                    arrived.put((False, exc))
                    return

        try:
            for process, bucket in busy:
                write_message(self._inbox(process), sorted(bucket, key=lambda task: task.client))
            readers = [threading.Thread(target=drain, args=(p, len(b)), daemon=True) for p, b in busy]
            for reader in readers:
                reader.start()
            for _ in range(sum(len(bucket) for _, bucket in busy)):
                ok, value = arrived.get()
                if not ok:
                    raise value
                yield value
            for reader in readers:
                reader.join()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for process in self.processes:
            try:
                write_message(self._inbox(process), None)
                self._inbox(process).close()
            except (OSError, ValueError):
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdout is not None:
                process.stdout.close()
        self.processes = []
