"""Episodic meta-training of the gradient-based methods (``fewshot train --method cxgrad ...``).

Each iteration draws ``meta_batch`` training tasks, adapts with the method's inner loop (second-order
unless ``--first-order``), and takes one Adam step on the query loss with respect to the initial
weights and the rule's own parameters. Validation (every ``val_every`` iterations, ``support``
BatchNorm) keeps the best checkpoint. Run folder as in supervised training: ``last.pt``, ``best.pt``,
``metrics.jsonl``, ``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fewshot.errors import ConfigError
from fewshot.models.data import check_dataset, dataset_spec, load_dataset
from fewshot.models.distributed import Ranks
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.evaluation import evaluate
from fewshot.models.meta.inner_loop import InnerLoopAdapter, inner_loop
from fewshot.models.meta.network import MetaConv4, support_statistics
from fewshot.models.meta.rules import UpdateRule, build_rule
from fewshot.models.folders import canonical
from fewshot.models.preprocess import InputSpec
from fewshot.models.training import pick_device, plot_curves


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on (saved in the checkpoint and the model card)."""

    method: str = "maml"
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 4
    iterations: int = 5000
    inner_steps: int = 5
    alpha: float = 0.01
    beta: float = 1.0
    #: CxGrad only: the inner step size of the linear head (0: ``alpha``, the authors' setting).
    head_alpha: float = 0.0
    outer_lr: float = 1e-3
    outer_lr_schedule: str = "constant"
    first_order: bool = False
    width: int = 64
    bn_train: str = "transductive"
    val_every: int = 250
    val_tasks: int = 200
    seed: int = 0
    threads: int = 0
    rotations: bool = False
    data_root: str | None = None
    #: ``learned`` (a (ways, d) head) or ``prototypes`` (Proto-MAML: any number of classes at test time).
    head_init: str = "learned"
    #: Ways of the training episodes drawn per episode, uniformly from ``min_ways..max_ways`` (0: ``ways``;
    #: a range needs a head that adapts any number of classes); validation then runs at ``ways`` and at
    #: ``max_ways`` and keeps the checkpoint with the best mean of the two.
    min_ways: int = 0
    max_ways: int = 0
    #: Start from this model's meta-parameters and rule (a models/zoo name or folder, or a run's .pt): fine-tuning.
    init_from: str = ""
    #: ``folder:PATH`` datasets: the model's input side and channels (0: 84 and 3); built-ins: their own.
    image_size: int = 0
    channels: int = 0

    def __post_init__(self) -> None:
        from fewshot.models.meta.network import BN_MODES
        from fewshot.models.meta.rules import RULES

        if self.method not in RULES:
            raise ConfigError(f"unknown --method {self.method!r}: use one of {', '.join(RULES)}")
        if self.bn_train not in BN_MODES:
            raise ConfigError(f"unknown --bn-train {self.bn_train!r}: use {' or '.join(BN_MODES)}")
        check_dataset(self.dataset)
        self.dataset = canonical(self.dataset)
        if self.ways < 2 or self.shots < 1 or self.inner_steps < 1 or self.meta_batch < 1:
            raise ConfigError("--ways must be >= 2 and --shots, --inner-steps, --meta-batch >= 1")
        if self.outer_lr_schedule not in OUTER_LR_SCHEDULES:
            raise ConfigError(f"unknown --outer-lr-schedule {self.outer_lr_schedule!r}: use {' or '.join(OUTER_LR_SCHEDULES)}")
        if self.head_alpha and self.method != "cxgrad":
            raise ConfigError("--head-alpha applies to --method cxgrad only (the other rules step every layer by --alpha)")
        if self.head_alpha < 0:
            raise ConfigError(f"--head-alpha must be positive (0: --alpha), got {self.head_alpha}")
        if self.rotations and self.dataset != "omniglot":
            raise ConfigError("--rotations applies to Omniglot only")
        from fewshot.models.meta.inner_loop import HEAD_INITS

        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"unknown --head-init {self.head_init!r}: use {' or '.join(HEAD_INITS)}")
        low, high = self.way_range()
        if not 2 <= low <= self.ways <= high:
            raise ConfigError(f"--min-ways {low} and --max-ways {high} must satisfy 2 <= min-ways <= --ways "
                              f"({self.ways}) <= max-ways")
        if (low, high) != (self.ways, self.ways) and self.head_init == "learned":
            raise ConfigError("--min-ways/--max-ways need a head that adapts any number of classes: "
                              "--head-init shared or prototypes (the learned head has --ways rows)")

    def way_range(self) -> tuple[int, int]:
        """``(min_ways, max_ways)`` of the training episodes (``(ways, ways)`` unless a range is set)."""
        return self.min_ways or self.ways, self.max_ways or self.ways

    def validation_ways(self) -> list[int]:
        """The ways validation runs at: ``ways``, and ``max_ways`` when training draws a range."""
        return sorted({self.ways, self.way_range()[1]})

    def outer_lr_at(self, iteration: int) -> float:
        """Outer (Adam) learning rate for ``iteration`` (0-based) of ``iterations``.

        ``constant``: ``outer_lr`` throughout. ``cosine``: half a cosine from ``outer_lr`` at iteration 0 down to
        ``outer_lr / 100`` at ``iterations``, counted on the absolute iteration, so a run resumed with a larger
        ``--iterations`` continues on the longer schedule from where it stands.
        """
        if self.outer_lr_schedule == "constant":
            return self.outer_lr
        low = self.outer_lr / 100
        return low + 0.5 * (self.outer_lr - low) * (1 + math.cos(math.pi * min(1.0, iteration / self.iterations)))


OUTER_LR_SCHEDULES = ("constant", "cosine")


def build_learner(cfg: MetaTrainConfig, spec: InputSpec) -> tuple[MetaConv4, UpdateRule]:
    per_step_bn = cfg.inner_steps + 1 if cfg.method == "mamlpp" else 0
    net = MetaConv4(spec.channels, cfg.width, spec.size, cfg.ways, per_step_bn)
    return net, build_rule(cfg.method, net, cfg.inner_steps, cfg.alpha, cfg.beta, cfg.head_alpha)


def query_loss(net: MetaConv4, cfg: MetaTrainConfig, adaptation, support: torch.Tensor, query: torch.Tensor,
               labels: torch.Tensor, iteration: int) -> torch.Tensor:
    """Query loss of one adapted task; MAML++ uses the multi-step loss with annealed weights."""
    return query_loss_and_logits(net, cfg, adaptation, support, query, labels, iteration)[0]


def query_loss_and_logits(net: MetaConv4, cfg: MetaTrainConfig, adaptation, support: torch.Tensor,
                          query: torch.Tensor, labels: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``query_loss`` and the query logits ``(Q, N)`` (detached) of the adapted weights after the last step."""
    logits: dict[int, torch.Tensor] = {}

    def loss_at(params, step):
        stats = support_statistics(net, params, support, step, differentiable=True) if cfg.bn_train == "support" else None
        logits[step] = net.forward(params, query, stats, step=step)
        return F.cross_entropy(logits[step], labels)

    steps = cfg.inner_steps
    if cfg.method != "mamlpp":
        return loss_at(adaptation.params, steps), logits[steps].detach()
    # MAML++: uniform weights annealed towards the last step over the first 10% of training.
    decay = min(1.0, iteration / max(1, 0.1 * cfg.iterations))
    w = torch.full((steps,), (1.0 - decay) / steps)
    w[-1] += decay
    loss = sum(w[t] * loss_at(adaptation.per_step[t], t + 1) for t in range(steps) if w[t] > 0)
    return loss, logits[steps].detach()


SNAPSHOTS = "snapshots"


def validate(cfg: MetaTrainConfig, net: MetaConv4, rule: UpdateRule, params: dict[str, torch.Tensor], val,
             spec: InputSpec, dev: torch.device | str, ways: int | None = None):
    """Validation of meta-parameters: ``cfg.val_tasks`` seeded ``ways``-way tasks (default ``cfg.ways``) of
    the val split, support BatchNorm.

    The tasks depend only on ``cfg.seed``, so every validation of a run sees the same tasks (paired comparison).
    """
    adapter = InnerLoopAdapter(net, rule, params, cfg.inner_steps, "support", head_init=cfg.head_init)
    return evaluate(adapter, val, lambda a: spec.normalize(a).to(dev), ways or cfg.ways, cfg.shots, cfg.queries,
                    cfg.val_tasks, seed=cfg.seed)


class WaysSampler:
    """Training episodes whose number of classes is drawn per episode, uniformly from ``low..high``;
    episode ``i`` depends only on ``(seed, i)`` (so a resumed run draws the same tasks)."""

    def __init__(self, dataset, low: int, high: int, shots: int, queries: int, seed: int) -> None:
        self.samplers = {n: EpisodeSampler(dataset, n, shots, queries, seed=seed) for n in range(low, high + 1)}
        self.low, self.high, self.seed = low, high, seed

    def episode(self, index: int):
        ways = int(np.random.default_rng([self.seed, 1, index]).integers(self.low, self.high + 1)) if self.high > self.low else self.low
        return self.samplers[ways].episode(index)


def _load_initial(source: str, meta: nn.ParameterDict, rule: UpdateRule) -> None:
    """Meta-parameters and rule from a shipped model (``weights.safetensors``: ``param.*``, ``rule.*``) or
    a meta-training checkpoint (``meta``, ``rule``), for fine-tuning; shapes must match."""
    path = Path(source)
    if path.suffix == ".pt":
        ck = torch.load(path, map_location="cpu", weights_only=False)
        params, rules = {k.replace("__", "."): v for k, v in ck["meta"].items()}, ck["rule"]
    else:
        from safetensors.torch import load_file

        from fewshot.models.zoo import model_dir

        tensors = load_file(str(model_dir(source) / "weights.safetensors"))
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        rules = {k.removeprefix("rule."): v for k, v in tensors.items() if k.startswith("rule.")}
    with torch.no_grad():
        for k, v in params.items():
            meta[k.replace(".", "__")].copy_(v)
    rule.load_state_dict(rules)


def train_meta(cfg: MetaTrainConfig, out_dir: Path, resume: bool = False, device: str = "auto") -> Path:
    """Meta-train and return the path of ``best.pt``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(device)
    ranks = Ranks.from_environment(dev)  # under torchrun: this process's share of each meta-batch
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    spec = dataset_spec(cfg.dataset, cfg.image_size, cfg.channels)
    train = load_dataset(cfg.dataset, "train", cfg.data_root, rotations=cfg.rotations, spec=spec)
    val = load_dataset(cfg.dataset, "val", cfg.data_root, spec=spec)
    net, rule = build_learner(cfg, spec)
    meta = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in net.init_params(torch.Generator().manual_seed(cfg.seed)).items()})
    if cfg.init_from and not (resume and (out_dir / "last.pt").exists()):
        _load_initial(cfg.init_from, meta, rule)
    meta, rule = meta.to(dev), rule.to(dev)
    ranks.broadcast(list(meta.parameters()) + list(rule.parameters()))
    opt = torch.optim.Adam(list(meta.parameters()) + list(rule.parameters()), lr=cfg.outer_lr)
    it, best = 0, -1.0
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if resume and last_path.exists():
        ck = torch.load(last_path, weights_only=False, map_location=dev)
        meta.load_state_dict(ck["meta"]), rule.load_state_dict(ck["rule"]), opt.load_state_dict(ck["opt"])
        it, best = ck["iteration"], ck["best"]
        print(f"resumed from {last_path} at iteration {it}/{cfg.iterations} (outer lr {cfg.outer_lr_at(it):.3g})")
    elif metrics_path.exists() and ranks.writer:
        metrics_path.unlink()
    ranks.barrier()
    sampler = WaysSampler(train, *cfg.way_range(), cfg.shots, cfg.queries, seed=cfg.seed + 10_000)
    second_order = not (cfg.first_order or cfg.method == "fomaml")

    def params() -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v for k, v in meta.items()}

    def save(path: Path, optimizer: bool = True) -> None:
        path.parent.mkdir(exist_ok=True)
        torch.save({"meta": meta.state_dict(), "rule": rule.state_dict(), "iteration": it, "best": best,
                    "config": asdict(cfg), "net_config": net.config, "spec": spec.to_dict(),
                    **({"opt": opt.state_dict()} if optimizer else {})}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def batch(idx: np.ndarray) -> torch.Tensor:
        return spec.normalize(train.images[idx]).to(dev)

    log = metrics_path.open("a") if ranks.writer else open(os.devnull, "w")
    bar = tqdm(total=cfg.iterations, initial=it, desc=f"meta-train {out_dir.name}", mininterval=5, disable=not ranks.writer)
    t0, window = time.perf_counter(), []
    while it < cfg.iterations:
        for group in opt.param_groups:  # set every iteration: a resumed run takes the schedule it is given now
            group["lr"] = cfg.outer_lr_at(it)
        opt.zero_grad(set_to_none=True)
        total, acc = 0.0, 0.0
        for b in ranks.mine(cfg.meta_batch):  # all of them alone; every world-th under torchrun
            ep = sampler.episode(it * cfg.meta_batch + b)
            xs, ys = batch(ep.support), torch.as_tensor(ep.support_labels, device=dev)
            xq, yq = batch(ep.query), torch.as_tensor(ep.query_labels, device=dev)
            ad = inner_loop(net, rule, params(), xs, ys, cfg.inner_steps, create_graph=second_order, head_init=cfg.head_init)
            loss, logits = query_loss_and_logits(net, cfg, ad, xs, xq, yq, it)
            (loss / cfg.meta_batch).backward()
            total += float(loss.detach())
            acc += float((logits.argmax(1) == yq).float().mean())  # in the --bn-train mode of the loss
        ranks.sum_gradients(list(meta.parameters()) + list(rule.parameters()))
        total, acc = ranks.sum([total, acc], dev)
        opt.step()
        it += 1
        window.append((total / cfg.meta_batch, acc / cfg.meta_batch))
        bar.update(1)
        if it % 25 == 0 or it == cfg.iterations:
            row = {"kind": "train", "step": it, "loss": float(np.mean([w[0] for w in window])),
                   "query_accuracy": 100 * float(np.mean([w[1] for w in window])),
                   "seconds_per_iteration": (time.perf_counter() - t0) / len(window),
                   "outer_lr": opt.param_groups[0]["lr"]}
            log.write(json.dumps(row) + "\n"), log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['query_accuracy']:.1f}")
            window, t0 = [], time.perf_counter()
        if (it % cfg.val_every == 0 or it == cfg.iterations) and not ranks.writer:
            ranks.barrier()  # rank 0 validates and writes the checkpoints meanwhile
        elif it % cfg.val_every == 0 or it == cfg.iterations:
            results = {n: validate(cfg, net, rule, params(), val, spec, dev, n) for n in cfg.validation_ways()}
            res = results[cfg.ways]
            score = float(np.mean([r.accuracy for r in results.values()]))
            row = {"kind": "val", "step": it, "accuracy": res.accuracy, "ci95": res.ci95}
            if len(results) > 1:
                row.update(score=score, by_ways={str(n): [r.accuracy, r.ci95] for n, r in results.items()})
            log.write(json.dumps(row) + "\n"), log.flush()
            others = "".join(f", {n}-way {r.accuracy:.2f} +- {r.ci95:.2f}" for n, r in results.items() if n != cfg.ways)
            tqdm.write(f"iteration {it}: val {cfg.ways}-way {cfg.shots}-shot (support BN) {res.accuracy:.2f} +- {res.ci95:.2f}{others}")
            if score > best:
                best = score
                save(best_path)
            save(last_path)
            save(out_dir / SNAPSHOTS / f"{it}.pt", optimizer=False)  # for fewshot average (weights only)
            plot_curves(metrics_path, out_dir / "curves.png")
            ranks.barrier()
    bar.close()
    log.close()
    ranks.close()
    return best_path
