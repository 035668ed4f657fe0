"""Label-free pre-training of the model's encoder before federated training (FedAli's MAE stage).

Pre-training runs on the CPU whatever ``run.device`` says: it happens once, before the run is assembled, on the
federation's CPU tensors, and its checkpoint (CPU tensors) initialises the CPU-built modules before the assembly
moves them to the run's device.
"""

from fedpal.pretraining.checkpoint import (
    PretrainedLoad,
    apply_pretrained,
    load_pretrained,
    match_pretrained,
    read_pretrained,
    save_pretrained,
)
from fedpal.pretraining.mae import MaskedAutoencoder, PretrainResult, pretrain_mae, pretraining_windows
from fedpal.pretraining.stage import (
    PRETRAINED_FILE,
    check_fits_run,
    needs_pretraining,
    pretrain_to_file,
    run_pretraining,
    with_run_pretraining,
)

__all__ = [
    "PRETRAINED_FILE",
    "MaskedAutoencoder",
    "PretrainResult",
    "PretrainedLoad",
    "apply_pretrained",
    "check_fits_run",
    "load_pretrained",
    "match_pretrained",
    "needs_pretraining",
    "pretrain_mae",
    "pretrain_to_file",
    "pretraining_windows",
    "read_pretrained",
    "run_pretraining",
    "save_pretrained",
    "with_run_pretraining",
]
