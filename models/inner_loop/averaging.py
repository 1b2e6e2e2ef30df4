"""Weight averaging of a meta-training run's last snapshots (Polyak / SWA-style, one model, no serving cost).

``fewshot train --method ...`` saves ``snapshots/ITER.pt`` at every validation. Averaging the meta-parameters
and the update rule's parameters of the snapshots from ``first_iteration`` on gives one set of weights, which is
validated on the run's own validation tasks (the same seeded tasks as every validation of the run) and becomes
``best.pt`` only if it beats the best single checkpoint there. The previous best is kept as ``best-single.pt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.errors import ConfigError
from fewshot.models.data import load_dataset
from fewshot.models.inner_loop.training import SNAPSHOTS, MetaTrainConfig, build_learner, validate
from fewshot.models.preprocess import InputSpec
from fewshot.models.training import pick_device


@dataclass
class AverageResult:
    iterations: list[int]
    accuracy: float
    ci95: float
    best_single: float
    kept: bool


def snapshot_iterations(run: Path) -> list[int]:
    """Iterations with a snapshot in ``run/snapshots``, ascending."""
    return sorted(int(p.stem) for p in (run / SNAPSHOTS).glob("*.pt") if p.stem.isdigit())


def average_checkpoints(paths: list[Path]) -> dict:
    """Checkpoint dict (as ``best.pt``) whose ``meta`` and ``rule`` tensors are the mean over ``paths``.

    Configuration, architecture and input spec come from the last path; ``averaged_iterations`` lists the inputs.
    """
    if not paths:
        raise ConfigError("no snapshots to average")
    cks = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    out = {k: v for k, v in cks[-1].items() if k != "opt"}
    for part in ("meta", "rule"):
        keys = cks[-1][part].keys()
        if any(ck[part].keys() != keys for ck in cks):
            raise ConfigError(f"snapshots disagree on their {part} parameters: not from one run")
        out[part] = {k: torch.stack([ck[part][k].float() for ck in cks]).mean(0).to(cks[-1][part][k].dtype) for k in keys}
    out["averaged_iterations"] = [int(ck["iteration"]) for ck in cks]
    return out


def average_run(run: Path, first_iteration: int, device: str = "auto") -> AverageResult:
    """Average the snapshots of ``run`` from ``first_iteration`` on, validate, keep as ``best.pt`` if better."""
    its = [i for i in snapshot_iterations(run) if i >= first_iteration]
    if len(its) < 2:
        raise ConfigError(
            f"{run}: fewer than 2 snapshots at or after iteration {first_iteration} "
            f"(have {snapshot_iterations(run) or 'none'}); train longer or lower --from-iteration"
        )
    ck = average_checkpoints([run / SNAPSHOTS / f"{i}.pt" for i in its])
    cfg = MetaTrainConfig(**ck["config"])
    best_path, single_path = run / "best.pt", run / "best-single.pt"
    single = torch.load(best_path, map_location="cpu", weights_only=False)
    if "averaged_iterations" in single:  # an earlier average is best.pt: compare with training's own best again
        single = torch.load(single_path, map_location="cpu", weights_only=False)
    else:
        best_path.replace(single_path)  # training's own best checkpoint (a later call compares against it too)
    dev = pick_device(device)
    spec = InputSpec.from_dict(ck["spec"])
    net, rule = build_learner(cfg, spec)
    rule.load_state_dict(ck["rule"])
    rule.to(dev)
    params = {k.replace("__", "."): v.to(dev) for k, v in ck["meta"].items()}
    res = validate(cfg, net, rule, params, load_dataset(cfg.dataset, "val", cfg.data_root, spec=spec), spec, dev)
    kept = res.accuracy > single["best"]
    ck["best"] = res.accuracy if kept else single["best"]
    torch.save(ck if kept else single, best_path.with_suffix(".tmp"))
    best_path.with_suffix(".tmp").replace(best_path)
    row = {
        "kind": "val_average",
        "iterations": its,
        "accuracy": res.accuracy,
        "ci95": res.ci95,
        "best_single": single["best"],
        "kept": kept,
    }
    with (run / "metrics.jsonl").open("a") as log:
        log.write(json.dumps(row) + "\n")
    return AverageResult(its, res.accuracy, res.ci95, single["best"], kept)
