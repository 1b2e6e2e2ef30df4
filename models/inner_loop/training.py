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
from typing import Any

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
from fewshot.models.folders import canonical
from fewshot.models.inner_loop.engine import InnerLoopAdapter, inner_loop
from fewshot.models.inner_loop.network import MetaConv4, NetworkTail, Params, support_statistics
from fewshot.models.inner_loop.rules import UpdateRule, build_rule
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
    #: Outer learning rate of the update rule's own parameters (CxGrad's g_phi, learned step sizes; 0:
    #: ``outer_lr``); follows the same schedule. From a pretrained backbone the scales start at the weight
    #: norms (tens), where ``outer_lr`` would move them by a few percent over a whole run.
    rule_lr: float = 0.0
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
    #: Pre-train, then meta-train (issue 33; Meta-Baseline, Chen et al. 2021): a shipped metric model
    #: (models/zoo name) whose conv and BatchNorm weights start the network, with its running statistics
    #: frozen (in units of each conv weight's norm: scale-invariant, as CxGrad's eq. 4 needs) and its
    #: feature transform (CL2N / L2N) before the head; the architecture (width, pools) is the backbone's.
    init_backbone: str = ""
    #: The first block the inner loop adapts (0: all four); the blocks before it are a fixed stem, neither
    #: adapted nor meta-trained, computed once per training image (needs --init-backbone).
    adapt_from: int = 0
    #: Initial temperature of the centroid head (--head-init centroid), meta-learned from there.
    head_temperature: float = 10.0

    def __post_init__(self) -> None:
        from fewshot.models.inner_loop.network import BN_MODES
        from fewshot.models.inner_loop.rules import RULES

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
        if self.head_alpha and self.method not in ("cxgrad", "cxgrad-task", "maml", "fomaml", "maml-lslr"):
            raise ConfigError(
                "--head-alpha applies to --method cxgrad, cxgrad-task, maml, fomaml and maml-lslr only (the other rules step every "
                "layer by --alpha or learn their steps)"
            )
        if self.head_alpha < 0:
            raise ConfigError(f"--head-alpha must be positive (0: --alpha), got {self.head_alpha}")
        if self.rotations and self.dataset != "omniglot":
            raise ConfigError("--rotations applies to Omniglot only")
        from fewshot.models.inner_loop.engine import HEAD_INITS

        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"unknown --head-init {self.head_init!r}: use {' or '.join(HEAD_INITS)}")
        low, high = self.way_range()
        if not 2 <= low <= self.ways <= high:
            raise ConfigError(f"--min-ways {low} and --max-ways {high} must satisfy 2 <= min-ways <= --ways ({self.ways}) <= max-ways")
        if self.init_backbone and self.bn_train != "support":
            raise ConfigError("--init-backbone keeps the backbone's BatchNorm statistics frozen: use --bn-train support")
        if self.adapt_from and not self.init_backbone:
            raise ConfigError("--adapt-from needs --init-backbone (a fixed stem is a pretrained one)")
        if self.head_init == "centroid" and not self.init_backbone:
            raise ConfigError("--head-init centroid starts from a metric backbone's transformed features: give --init-backbone")
        if self.head_temperature <= 0:
            raise ConfigError(f"--head-temperature must be positive, got {self.head_temperature}")
        if (low, high) != (self.ways, self.ways) and self.head_init == "learned":
            raise ConfigError(
                "--min-ways/--max-ways need a head that adapts any number of classes: "
                "--head-init shared or prototypes (the learned head has --ways rows)"
            )

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
    if cfg.init_backbone:
        from fewshot.models.zoo import load_model

        backbone = load_model(cfg.init_backbone)
        arch = backbone.card.architecture
        if arch.get("arch") != "conv4" or arch["width"] != cfg.width:
            raise ConfigError(
                f"--init-backbone {cfg.init_backbone} is a {arch.get('arch')} of width {arch.get('width')}: "
                f"meta-training takes a Conv-4 of --width {cfg.width}"
            )
        if backbone.spec.to_dict() != spec.to_dict():
            raise ConfigError(f"--init-backbone {cfg.init_backbone} was trained on other inputs than --dataset {cfg.dataset}")
        if per_step_bn:
            raise ConfigError("--init-backbone does not apply to --method mamlpp (per-step BatchNorm)")
        transform = backbone.card.heads.get("centroid", {}).get("transform", "L2N")
        net = MetaConv4(
            spec.channels,
            cfg.width,
            spec.size,
            cfg.ways,
            0,
            pools=arch.get("pools", 4),
            frozen_bn=True,
            transform="" if transform == "UN" else transform,
            adapt_from=cfg.adapt_from,
        )
    else:
        net = MetaConv4(spec.channels, cfg.width, spec.size, cfg.ways, per_step_bn)
    return net, build_rule(cfg.method, net, cfg.inner_steps, cfg.alpha, cfg.beta, cfg.head_alpha)


def backbone_params(net: MetaConv4, backbone, temperature: float) -> Params:
    """Meta-parameters of ``net`` (``frozen_bn``) from a loaded metric model (:class:`~fewshot.models.zoo.ShippedModel`):
    its convs and BatchNorm affine weights; its running statistics in units of each conv weight's norm
    (``mu / ||W||``, ``(sigma^2 + eps_backbone - eps_net) / ||W||^2``, so the network equals the backbone's
    eval mode to float rounding); its centering vector; the head at the centroid's place with temperature
    ``temperature``."""
    convs = [m for m in backbone.backbone.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in backbone.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != 4 or len(norms) != 4:
        raise ConfigError("--init-backbone must be a Conv-4 (four conv + BatchNorm blocks)")
    params = net.init_params()
    for l, (conv, bn) in enumerate(zip(convs, norms)):
        w = conv.weight.detach().float()
        n = w.norm()
        params[f"conv{l}.weight"] = w.clone()
        params[f"bn{l}.weight"], params[f"bn{l}.bias"] = bn.weight.detach().clone(), bn.bias.detach().clone()
        assert bn.running_mean is not None and bn.running_var is not None  # a Conv-4's BatchNorm tracks running statistics
        params[f"bn{l}.mean"] = bn.running_mean.detach() / n
        params[f"bn{l}.var"] = (bn.running_var.detach() + bn.eps - net.bn_eps) / (n * n)
    if net.transform == "CL2N":
        if backbone.center is None:
            raise ConfigError(f"--init-backbone {backbone.name} has no centering vector (CL2N needs one)")
        params["center"] = backbone.center.detach().float().clone()
    if net.transform:
        params["head.log_scale"] = torch.tensor(math.log(temperature))
    return params


def query_loss(
    net: MetaConv4 | NetworkTail,
    cfg: MetaTrainConfig,
    adaptation,
    support: torch.Tensor,
    query: torch.Tensor,
    labels: torch.Tensor,
    iteration: int,
) -> torch.Tensor:
    """Query loss of one adapted task; MAML++ uses the multi-step loss with annealed weights."""
    return query_loss_and_logits(net, cfg, adaptation, support, query, labels, iteration)[0]


def query_loss_and_logits(
    net: MetaConv4 | NetworkTail,
    cfg: MetaTrainConfig,
    adaptation,
    support: torch.Tensor,
    query: torch.Tensor,
    labels: torch.Tensor,
    iteration: int,
) -> tuple[torch.Tensor, torch.Tensor]:
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


def validate(
    cfg: MetaTrainConfig,
    net: MetaConv4,
    rule: UpdateRule,
    params: dict[str, torch.Tensor],
    val,
    spec: InputSpec,
    dev: torch.device | str,
    ways: int | None = None,
):
    """Validation of meta-parameters: ``cfg.val_tasks`` seeded ``ways``-way tasks (default ``cfg.ways``) of
    the val split, support BatchNorm.

    The tasks depend only on ``cfg.seed``, so every validation of a run sees the same tasks (paired comparison).
    """
    adapter = InnerLoopAdapter(net, rule, params, cfg.inner_steps, "support", head_init=cfg.head_init)
    return evaluate(
        adapter, val, lambda a: spec.normalize(a).to(dev), ways or cfg.ways, cfg.shots, cfg.queries, cfg.val_tasks, seed=cfg.seed
    )


class WaysSampler:
    """Training episodes whose number of classes is drawn per episode, uniformly from ``low..high``;
    episode ``i`` depends only on ``(seed, i)`` (so a resumed run draws the same tasks)."""

    def __init__(self, dataset, low: int, high: int, shots: int, queries: int, seed: int) -> None:
        self.samplers = {n: EpisodeSampler(dataset, n, shots, queries, seed=seed) for n in range(low, high + 1)}
        self.low, self.high, self.seed = low, high, seed

    def episode(self, index: int):
        ways = int(np.random.default_rng([self.seed, 1, index]).integers(self.low, self.high + 1)) if self.high > self.low else self.low
        return self.samplers[ways].episode(index)


def _stem_features(
    net: MetaConv4, params: Params, images: np.ndarray, spec: InputSpec, dev: torch.device | str, chunk: int = 500
) -> torch.Tensor:
    """The fixed stem's output for every image ``(N, width, h, w)``, on the CPU (float32; 16 KB per Tiny
    ImageNet image: about 1 GB for its training split). Kept in the data cache under a digest of the stem's
    weights and the images, so the runs of one backbone (MAML, CxGrad, resumed ones) compute it once."""
    import hashlib

    from fewshot.models.data import atomic_save, cache_dir

    digest = hashlib.sha256()
    for name in sorted(params):
        if any(name.startswith(f"{kind}{l}.") for l in range(net.adapt_from) for kind in ("conv", "bn")):
            digest.update(name.encode() + params[name].detach().cpu().numpy().tobytes())
    digest.update(str((images.shape, spec.to_dict())).encode() + images[:: max(1, len(images) // 64)].tobytes())
    path = cache_dir() / f"stem-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    out = []
    for i in tqdm(range(0, len(images), chunk), desc="stem features (once)", mininterval=5):
        x = spec.normalize(images[i : i + chunk]).to(dev).contiguous(memory_format=torch.channels_last)
        out.append(net.stem(params, x).cpu().contiguous())
    features = torch.cat(out)
    atomic_save(path, array=features.numpy())
    return features


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
    if cfg.init_backbone:
        from fewshot.models.zoo import load_model

        initial = backbone_params(net, load_model(cfg.init_backbone), cfg.head_temperature)
        rule.start_at(initial)
    else:
        initial = net.init_params(torch.Generator().manual_seed(cfg.seed))
    frozen = set(net.frozen_names())
    meta = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=k not in frozen) for k, v in initial.items()})
    if cfg.init_from and not (resume and (out_dir / "last.pt").exists()):
        _load_initial(cfg.init_from, meta, rule)
    meta, rule = meta.to(dev), rule.to(dev)
    ranks.broadcast(list(meta.parameters()) + list(rule.parameters()))
    groups: list[dict[str, Any]] = [{"params": [p for p in meta.parameters() if p.requires_grad], "scale": 1.0}]
    if list(rule.parameters()):
        groups.append({"params": list(rule.parameters()), "scale": (cfg.rule_lr or cfg.outer_lr) / cfg.outer_lr})
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, lr=cfg.outer_lr)
    it, best = 0, -1.0
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if resume and last_path.exists():
        ck = torch.load(last_path, weights_only=False, map_location=dev)
        meta.load_state_dict(ck["meta"]), rule.load_state_dict(ck["rule"])
        if len(ck["opt"]["param_groups"]) == len(opt.param_groups):
            opt.load_state_dict(ck["opt"])
        else:  # a checkpoint from before the rule had its own group: Adam's moments start afresh
            print("the checkpoint's optimiser has other parameter groups: Adam's moment estimates restart")
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
        torch.save(
            {
                "meta": meta.state_dict(),
                "rule": rule.state_dict(),
                "iteration": it,
                "best": best,
                "config": asdict(cfg),
                "net_config": net.config,
                "spec": spec.to_dict(),
                **({"opt": opt.state_dict()} if optimizer else {}),
            },
            path.with_suffix(".tmp"),
        )
        path.with_suffix(".tmp").replace(path)

    learner = net.tail() if net.adapt_from else net
    stem_cache = _stem_features(net, params(), train.images, spec, dev) if net.adapt_from else None

    def batch(idx: np.ndarray) -> torch.Tensor:
        if stem_cache is not None:  # the fixed stem's output, computed once per image
            return stem_cache[torch.as_tensor(idx)].to(dev)
        return spec.normalize(train.images[idx]).to(dev)

    log = metrics_path.open("a") if ranks.writer else open(os.devnull, "w")
    if it == 0 and ranks.writer and cfg.init_backbone:
        # where meta-training starts (the centroid's answer with --head-init centroid): the curve's first point
        for n in cfg.validation_ways():
            res = validate(cfg, net, rule, params(), val, spec, dev, n)
            log.write(json.dumps({"kind": "val", "step": 0, "ways": n, "accuracy": res.accuracy, "ci95": res.ci95}) + "\n")
            tqdm.write(f"iteration 0: val {n}-way {cfg.shots}-shot {res.accuracy:.2f} +- {res.ci95:.2f}")
        log.flush()
    bar = tqdm(total=cfg.iterations, initial=it, desc=f"meta-train {out_dir.name}", mininterval=5, disable=not ranks.writer)
    t0, window = time.perf_counter(), []
    while it < cfg.iterations:
        for group in opt.param_groups:  # set every iteration: a resumed run takes the schedule it is given now
            group["lr"] = cfg.outer_lr_at(it) * group.get("scale", 1.0)
        opt.zero_grad(set_to_none=True)
        total, acc = 0.0, 0.0
        for b in ranks.mine(cfg.meta_batch):  # all of them alone; every world-th under torchrun
            ep = sampler.episode(it * cfg.meta_batch + b)
            xs, ys = batch(ep.support), torch.as_tensor(ep.support_labels, device=dev)
            xq, yq = batch(ep.query), torch.as_tensor(ep.query_labels, device=dev)
            ad = inner_loop(learner, rule, params(), xs, ys, cfg.inner_steps, create_graph=second_order, head_init=cfg.head_init)
            loss, logits = query_loss_and_logits(learner, cfg, ad, xs, xq, yq, it)
            (loss / cfg.meta_batch).backward()
            total += float(loss.detach())
            acc += float((logits.argmax(1) == yq).float().mean())  # in the --bn-train mode of the loss
        ranks.sum_gradients(trained)
        total, acc = ranks.sum([total, acc], dev)
        opt.step()
        it += 1
        window.append((total / cfg.meta_batch, acc / cfg.meta_batch))
        bar.update(1)
        if it % 25 == 0 or it == cfg.iterations:
            row = {
                "kind": "train",
                "step": it,
                "loss": float(np.mean([w[0] for w in window])),
                "query_accuracy": 100 * float(np.mean([w[1] for w in window])),
                "seconds_per_iteration": (time.perf_counter() - t0) / len(window),
                "outer_lr": opt.param_groups[0]["lr"],
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
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
            log.write(json.dumps(row) + "\n")
            log.flush()
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
