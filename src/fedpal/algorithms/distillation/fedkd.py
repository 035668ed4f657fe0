"""FedKD (Wu et al., 2022, "Communication-efficient federated learning via knowledge distillation"), as in HtFLlib.

Each client keeps a large personal teacher and trains a small shared student with it by adaptive mutual
distillation (the distillation terms are scaled down when the two models' own predictions are poor), and only the
student travels, compressed by a truncated SVD whose kept energy grows over the rounds. The teacher fits local data;
the student, averaged across clients, carries shared knowledge back to every teacher at a fraction of the bytes.

HtFLlib (`clientkd.py`, `serverkd.py`, `main.py`, `total.sh`):
- per batch, with teacher t (the client's model), student s (the shared model), features h, logits z, W_h a
  personal Linear(D -> D, no bias), KL = ``nn.KLDivLoss()`` (mean over B*C, target not detached), MSE mean:
  L_t = CE_t + KL(p_s || p_t)/(CE_t + CE_s) + MSE(h_t, W_h h_s)/(CE_t + CE_s),
  L_s = CE_s + KL(p_t || p_s)/(CE_t + CE_s) + MSE(h_t, W_h h_s)/(CE_t + CE_s)
  (the denominator is not detached); both backward passes accumulate into teacher, student and W_h; each gradient
  is clipped to norm 10; SGD with lr (teacher, W_h) and the mentee lr (student, -mlr 0.01);
- the client uploads the SVD-compressed student **weights** (parameters, not the update); the server recovers each,
  averages **uniformly** over the clients, compresses the average and sends it to all clients, who replace the
  student's parameters by its reconstruction; round 1 starts from the server's initial student (dense here);
- compression: every parameter with ndim > 1 and shape[0] > 1 (names containing "embeddings" excepted) is split
  into the matrices of its last two axes (a 4-D conv weight into its kh x kw kernels), all sharing one rank: the
  smallest r whose singular values hold a fraction >= energy of the tensor's squared singular-value mass;
- energy: T_start 0.95 -> T_end 0.98 linearly over the rounds (HtFLlib sets T_start + (1 + i)/R * (T_end - T_start)
  after its round i = 0..R; here round r of R uses T_start + (r - 1)/(R - 1) * (T_end - T_start), the same end
  points), both directions in a round at the same energy;
- the evaluated model is the teacher (the client's own model).

Departures: (1) HtFLlib picks the rank with a strict ">" inside ``range(len(sigma))`` and falls back to rank 0 (an
all-zero tensor) when only the full rank reaches the energy; here the rank is the smallest r in 1..k with energy
>= threshold, so the full rank is possible and threshold 1.0 reconstructs exactly. (2) HtFLlib sends (u, sigma, v);
here sigma is folded into u (U*S and V), the same information in fewer bytes; every factor travels as a tensor, so
the engine counts its real size. (3) HtFLlib's 3-D tensors (1-D convolutions) mix axes; here every tensor with more
than two axes is treated like HtFLlib's 4-D case (matrices of the last two axes). ``svd_layout = "flatten"`` is an
option (not in HtFLlib): one [out, rest] matrix per weight, which compresses convolutions far better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.contract import (
    Algorithm,
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import LocalTrainer
from fedpal.algorithms.distillation.mutual import (
    Member,
    MutualBatch,
    build_shared_trainer,
    kl_mean,
    mutual_fit,
    parameter_names,
    shared_architecture,
)
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

FALLBACK_ROUNDS = 2000  # HtFLlib's default global_rounds, when neither the hp nor the setup names R


@dataclass(frozen=True)
class FedKDHyperparameters:
    mentee_lr: float = 0.01  # student learning rate (HtFLlib -mlr 0.01); 0 = train.lr
    t_start: float = 0.95  # SVD energy kept in the first round (HtFLlib -Ts 0.95)
    t_end: float = 0.98  # SVD energy kept in the last round (HtFLlib -Te 0.98)
    schedule_rounds: int = 0  # R of the energy schedule; 0 = the run's rounds when the engine passes them
    shared_model: str = ""  # architecture of the student; "" = the run's first architecture (HtFLlib's choice)
    # htfllib: matrices of the last two axes | flatten: one [out, rest] matrix
    svd_layout: Literal["htfllib", "flatten"] = "htfllib"
    clip_norm: float = 10.0  # per-module gradient-norm clip (HtFLlib hard-codes 10); 0 = off
    shuffle_train: bool = False  # HtFLlib's train loader is unshuffled (fixed order every epoch)
    drop_last: bool = True  # HtFLlib's train loader drops the last partial batch (a lone partial batch is kept)


# ------------------------------------------------------------------------------------------- SVD compression


def compressible(name: str, tensor: torch.Tensor) -> bool:
    """HtFLlib's rule: more than one axis, more than one row, and not an embedding table."""
    return tensor.ndim > 1 and tensor.shape[0] > 1 and "embeddings" not in name


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r >= 1 whose first r singular values (pooled over any leading batch axes) hold >= ``energy`` of
    the squared mass; the full rank k when nothing less does."""
    power = singular_values.double().pow(2).reshape(-1, singular_values.shape[-1]).sum(0)
    cumulative = power.cumsum(0)
    rank = int((cumulative < energy * cumulative[-1]).sum()) + 1
    return min(rank, singular_values.shape[-1])


def low_rank(tensor: torch.Tensor, energy: float, layout: str = "htfllib") -> tuple[torch.Tensor, torch.Tensor]:
    """(U*S, V) truncated to the energy rank; ``us @ v`` (reshaped to the tensor's shape) reconstructs it."""
    matrix = tensor.reshape(tensor.shape[0], -1) if layout == "flatten" else tensor
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = energy_rank(s, energy)
    return (u[..., :r] * s[..., None, :r]).contiguous(), vh[..., :r, :].contiguous()


def compress(params: Tensors, energy: float, layout: str = "htfllib") -> dict[str, Tensors]:
    """A parameter set as three parameter sets: "dense" (sent as is), "us" and "v" (low-rank factors)."""
    dense: Tensors = {}
    us: Tensors = {}
    v: Tensors = {}
    for name, tensor in params.items():
        if compressible(name, tensor):
            us[name], v[name] = low_rank(tensor.detach(), energy, layout)
        else:
            dense[name] = tensor.detach().clone()
    return {"dense": dense, "us": us, "v": v}


def recover(dense: Tensors, us: Tensors, v: Tensors, reference: Tensors) -> Tensors:
    """The full parameter set from its compressed form; ``reference`` gives the names and shapes expected."""
    out: Tensors = {}
    for name, like in reference.items():
        value = torch.matmul(us[name], v[name]).reshape(like.shape) if name in us else dense[name]
        if value.shape != like.shape:
            raise ValueError(f"fedkd: '{name}' recovers to shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------- the algorithm


@register_algorithm
class FedKD(Algorithm):
    name = "fedkd"
    description = "personal teacher + shared student, adaptive mutual distillation, SVD-compressed student (2022)"
    reads_replies_directly = ("dense", "us", "v")  # students rebuilt from each client's low-rank factors
    Hyperparameters = FedKDHyperparameters
    supports_heterogeneous_models = True

    def __init__(self, hp: FedKDHyperparameters, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if not (0.0 < hp.t_start <= 1.0 and 0.0 < hp.t_end <= 1.0):
            raise ConfigError("algorithm.t_start and algorithm.t_end are energy fractions in (0, 1]")
        self.student_name = shared_architecture(hp.shared_model, setup.architectures)
        self.student = build_shared_trainer(setup.build_module, self.student_name, setup.train, setup.seed)
        names = parameter_names(self.student.module)
        initial = self.student.snapshot()
        self.student_initial = {k: initial[k] for k in names}
        self.student_buffers = {k: v for k, v in initial.items() if k not in self.student_initial}
        self.teacher_dim = int(setup.initial_params["head.weight"].shape[1])  # D of every family member
        self.student_dim = int(self.student_initial["head.weight"].shape[1])
        w_h = nn.Linear(self.student_dim, self.teacher_dim, bias=False).to(setup.device)
        self.w_h = LocalTrainer(w_h, setup.train)
        self.rounds = hp.schedule_rounds or setup.rounds or FALLBACK_ROUNDS

    def energy(self, round: int) -> float:
        """The SVD energy threshold of round ``round`` (1-based): T_start in round 1, T_end in round R."""
        hp = self.hp
        progress = 1.0 if self.rounds <= 1 else min(max(round - 1, 0) / (self.rounds - 1), 1.0)
        return float(hp.t_start + progress * (hp.t_end - hp.t_start))

    # ---- server
    def init_server(self) -> ServerState:
        # Round 1 sends the initial student dense: HtFLlib's clients copy the server's initial model uncompressed.
        return {"dense": {k: v.clone() for k, v in self.student_initial.items()}, "us": {}, "v": {}}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"dense": state["dense"], "us": state["us"], "v": state["v"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        students = {cid: recover(r["dense"], r["us"], r["v"], self.student_initial) for cid, r in replies.items()}
        average = reduce(students, None)  # uniform, as HtFLlib
        return compress(average, self.energy(round), self.hp.svd_layout)

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        with torch.random.fork_rng(devices=[]):  # a personal W_h, seeded per client (nn.Linear's own init)
            torch.manual_seed(derive_seed(self.setup.seed, "fedkd-w_h", client.id))
            weight = nn.Linear(self.student_dim, self.teacher_dim, bias=False).weight.detach()
        w_h = {"weight": weight.to(client.device, copy=True)}  # drawn on the CPU, kept on the client's device
        return {"params": client.own_initial_params(), "w_h": w_h}

    def mutual_loss(self, batch: MutualBatch) -> torch.Tensor:
        assert batch.extra is not None
        ce_t = F.cross_entropy(batch.logits_a, batch.y)
        ce_s = F.cross_entropy(batch.logits_b, batch.y)
        scale = ce_t + ce_s  # adaptive: weak distillation while either model is still wrong
        hidden = F.mse_loss(batch.features_a, batch.extra(batch.features_b))
        teacher = ce_t + kl_mean(batch.logits_a, batch.logits_b) / scale + hidden / scale
        student = ce_s + kl_mean(batch.logits_b, batch.logits_a) / scale + hidden / scale
        return teacher + student

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        student = recover(payload["dense"], payload["us"], payload["v"], self.student_initial)
        result = mutual_fit(
            Member(client.trainer, state["params"]),
            Member(self.student, {**student, **self.student_buffers}, self.hp.mentee_lr or None),
            client.train_x,
            client.train_y,
            client.generator("train"),
            self.mutual_loss,
            extra=Member(self.w_h, state["w_h"]),
            clip_norm=self.hp.clip_norm,
            shuffle=self.hp.shuffle_train,
            drop_last=self.hp.drop_last,
        )
        trained = {k: result.second[k] for k in self.student_initial}
        reply = compress(trained, self.energy(client.round), self.hp.svd_layout)
        return {"params": result.first, "w_h": result.extra}, reply

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        dense_names = [k for k, v in self.student_initial.items() if not compressible(k, v)]
        return {"dense": {k: self.student_initial[k].shape for k in dense_names}}
