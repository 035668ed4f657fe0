"""Record short runs of every algorithm, so a refactor can be checked bit for bit against the code before it.

    python scripts/record_summaries.py --out before.json      # on the old code
    python scripts/record_summaries.py --compare before.json  # on the new code: exit 1 on any difference

Each case is a tiny 2-round run (digits MLP for weight-sharing methods, the image5 family for heterogeneous ones,
HAPT with HART+ALP for FedAli); what is recorded is every evaluation and the summary without wall times, so two
recordings are equal only when every reported number is.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

import fedpal
from fedpal.algorithms.core.registry import all_algorithms

BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 5, "min_samples": 20},
    "model": {"name": "mlp", "hidden_dim": 32, "feature_dim": 16},
    # the keys a method may recommend are set, so every method keeps these exact settings
    "train": {
        "rounds": 2,
        "batch_size": 32,
        "lr": 0.05,
        "threads": 1,
        "clients_per_round": 4,
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "local_epochs": 1,
    },
    "eval": {"generalization_samples": 300},
    "run": {"progress": False},
}
IMAGE5 = {"name": "mlp", "hidden_dim": 32, "feature_dim": 32, "family": "image5"}
# adapter methods: both mosaic trunks with dual adapters, a few steps a round
MOSAIC = {"name": "mosaic_small", "family": "mosaic", "feature_dim": 16, "adapters": True, "adapter_init": "random"}
TASK_STREAM = {"dataset": "task_stream", "num_clients": 10, "samples_per_task": 20, "task_public_samples": 200}
FEDALI: dict[str, Any] = {
    "seed": 1,
    "data": {"dataset": "hapt", "partition": "natural", "num_clients": 4, "unseen_clients": 1, "split_gap": 1},
    "model": {"name": "hart_alp", "feature_dim": 16, "width": 16, "blocks": 2, "bank_sizes": [8, 4]},
    "train": {"rounds": 2, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "threads": 1},
    "eval": {"generalization_samples": 300},
    "run": {"progress": False},
    "algorithm": {"name": "fedali"},
}
# Hyperparameter settings that take other code paths than the defaults.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{"evaluate": "post_local"}],
    "fedproto": [{"preset": "fedali"}],
    "protonorm": [{"pa": False}],
}


def merged(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def cases() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, cls in all_algorithms().items():
        if name == "fedali":
            out["fedali/hapt"] = FEDALI
            continue
        if cls.requires_adapters:
            out[f"{name}/mosaic"] = merged(BASE, model=MOSAIC, algorithm={"name": name, "local_steps": 4})
            continue
        for i, extra in enumerate([{}, *VARIANTS.get(name, [])]):
            tag = f"{name}/mlp" + (f"/v{i}" if i else "")
            out[tag] = merged(BASE, algorithm={"name": name, **extra})
        if cls.supports_heterogeneous_models:
            out[f"{name}/image5"] = merged(BASE, model=IMAGE5, algorithm={"name": name})
    out["fedmosaic/task_stream"] = merged(
        BASE,
        data=TASK_STREAM,
        model={**MOSAIC, "adapter_init": "aligned"},
        algorithm={"name": "fedmosaic", "local_steps": 4},
    )
    out["fedavg/mlp/unseen"] = merged(BASE, data={"unseen_clients": 1}, algorithm={"name": "fedavg"})
    out["fedproto/image5/unseen"] = merged(
        BASE, model=IMAGE5, data={"unseen_clients": 1}, algorithm={"name": "fedproto"}
    )
    return out


def without_wall(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_wall(v) for k, v in value.items() if k != "wall_seconds"}
    if isinstance(value, list):
        return [without_wall(v) for v in value]
    return value


def record(only: str | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    results = {}
    for tag, raw in cases().items():
        if only and only not in tag:
            continue
        result = fedpal.run(raw)
        results[tag] = without_wall({"summary": result.summary, "metrics": result.metrics})
        print(tag, round(result.personalized_accuracy, 4), file=sys.stderr)
    return json.loads(json.dumps(results))  # NaN survives as NaN; tuples become lists


def differences(a: Any, b: Any, path: str = "", added: list[str] | None = None) -> list[str]:
    """Every value that differs between recordings ``a`` (old) and ``b`` (new); keys only the new recording has
    are not differences but go to ``added``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a:
                if added is not None:
                    added.append(f"{path}.{key}")
            elif key not in b:
                out.append(f"{path}.{key}: missing in the new recording")
            else:
                out += differences(a[key], b[key], f"{path}.{key}", added)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]", added)]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} != {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the recording here")
    parser.add_argument("--compare", type=Path, help="compare against an earlier recording")
    parser.add_argument("--only", help="run only cases whose tag contains this text")
    args = parser.parse_args()
    results = record(args.only)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        diffs: list[str] = []
        added: list[str] = []
        for tag, value in results.items():
            if tag not in before:
                print(f"{tag}: not in the earlier recording")
                continue
            diffs += [f"{tag}{d}" for d in differences(before[tag], value, "", added)]
        new_keys = sorted({a.split(".", 1)[-1] if "]" not in a else a.split("]", 1)[-1] for a in added})
        if new_keys:
            print(f"new keys (not differences): {', '.join(new_keys)}")
        print("\n".join(diffs[:200]) if diffs else f"identical: {len(results)} cases, every recorded value equal")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
