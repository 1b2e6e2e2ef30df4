"""Inner-loop update rules as pluggable parts of one engine (the survey slides' view: each method
changes the update rule, not the loop).

A rule is an ``nn.Module``: its own parameters (learned step sizes, curvature factors, gates, CxGrad's
``g_phi``) are meta-learned in the outer loop together with the network's initial weights. The engine
(:mod:`fewshot.models.inner_loop.engine`) calls, per task:

* ``begin(...)`` once, returning a per-task context (CxGrad: the context vector ``nu``);
* per step ``t``: ``effective(params, ctx, t)`` (CxGrad: implicit gradient scaling), a support
  loss, one ``autograd.grad`` with respect to ``adapted_names`` of the effective parameters and
  ``extra(ctx)``, then ``update(t, params, grads, extra_grads, loss, ctx)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.models.inner_loop.network import MetaConv4, Params

Context = dict[str, Any]
LossFn = Callable[[Params, int], torch.Tensor]


class UpdateRule(nn.Module):
    """Plain gradient descent ``theta <- theta - alpha * grad`` (MAML, first- or second-order)."""

    name = "maml"
    #: Whether the rule runs on stacked tasks (parameters with a leading task axis, one summed loss;
    #: :func:`fewshot.models.inner_loop.stacked.stacked_inner_loop`): its update is elementwise or per task.
    stackable = True

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01, head_alpha: float = 0.0) -> None:
        """``head_alpha``: the step size of the linear head (0: ``alpha``)."""
        super().__init__()
        self.steps, self.alpha = steps, alpha
        self.head_alpha, self.head_names = head_alpha or alpha, set(net.head_names)
        self._adapted = net.conv_names + net.head_names

    def adapted_names(self) -> list[str]:
        """Parameters the inner loop changes (BatchNorm affine parameters are meta-learned only)."""
        return list(self._adapted)

    def begin(self, params: Params, support_loss: LossFn) -> Context:
        return {}

    def effective(self, params: Params, ctx: Context, step: int) -> Params:
        return params

    def extra(self, ctx: Context) -> list[torch.Tensor]:
        return []

    def step_size(self, name: str, step: int) -> torch.Tensor | float:
        return self.head_alpha if name in self.head_names else self.alpha

    def start_at(self, params: Params) -> None:
        """Set the rule's own parameters for an initialisation ``params`` (a pretrained backbone): nothing here."""

    def direction(self, name: str, grad: torch.Tensor, step: int, ctx: Context, params: Params, loss: torch.Tensor) -> torch.Tensor:
        return grad

    def update(
        self, step: int, params: Params, grads: dict[str, torch.Tensor], extra_grads: list[torch.Tensor], loss: torch.Tensor, ctx: Context
    ) -> tuple[Params, Context]:
        new = dict(params)
        for name, g in grads.items():
            new[name] = params[name] - self.step_size(name, step) * self.direction(name, g, step, ctx, params, loss)
        return new, ctx


class MetaSGD(UpdateRule):
    """Meta-SGD (Li et al. 2017): a learned step size per parameter coordinate; its sign lets the
    rule learn the update direction too. ``theta <- theta - alpha (.) grad``."""

    name = "metasgd"

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01, shapes: dict[str, torch.Size] | None = None) -> None:
        super().__init__(net, steps, alpha)
        shapes = shapes or {k: v.shape for k, v in net.init_params().items()}
        self.alphas = nn.ParameterDict({_key(n): nn.Parameter(torch.full(shapes[n], alpha)) for n in self._adapted})

    def step_size(self, name: str, step: int) -> torch.Tensor:
        return self.alphas[_key(name)]


class LearnedLayerSteps(UpdateRule):
    """MAML with learned per-layer, per-step step sizes (MAML++'s LSLR, Antoniou et al. 2019, without its
    multi-step loss and per-step BatchNorm): ``theta_l <- theta_l - alpha_{t,l} grad_l``, ``alpha_{t,l}`` a
    meta-parameter started at ``alpha`` (``head_alpha`` for the head). What the paper's CxGrad reduces to where
    its context carries nothing (issue 33): one learned step size per layer."""

    name = "maml-lslr"

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01, head_alpha: float = 0.0) -> None:
        super().__init__(net, steps, alpha, head_alpha)
        self.layer_of = {n: i for i, n in enumerate(self._adapted)}
        start = torch.tensor([self.head_alpha if n in self.head_names else alpha for n in self._adapted])
        self.lrs = nn.Parameter(start.repeat(steps, 1))

    def step_size(self, name: str, step: int) -> torch.Tensor:
        return self.lrs[min(step, self.steps - 1), self.layer_of[name]]


class MAMLPlusPlus(LearnedLayerSteps):
    """MAML++ (Antoniou et al. 2019): learned per-layer, per-step step sizes (LSLR). The multi-step
    loss and per-step BatchNorm are set up by the meta-trainer and :class:`MetaConv4`."""

    name = "mamlpp"

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01) -> None:
        super().__init__(net, steps, alpha)


class BOIL(UpdateRule):
    """BOIL (Oh et al. 2021): the head is frozen in the inner loop; only the body adapts."""

    name = "boil"

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01) -> None:
        super().__init__(net, steps, alpha)
        self._adapted = list(net.conv_names)


class MetaCurvature(UpdateRule):
    """Meta-Curvature (Park and Oliva 2019): each layer's gradient is transformed by Kronecker
    factors, ``MC(G) = G x_3 M_f x_2 M_i x_1 M_o`` for a conv gradient ``G (out, in, k*k)``; linear
    weights use ``M_o, M_i`` and vectors ``M_o``. All factors start as identities."""

    name = "metacurvature"
    stackable = False  # the Kronecker factors act on each task's whole gradient matrix

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01, shapes: dict[str, torch.Size] | None = None) -> None:
        super().__init__(net, steps, alpha)
        shapes = shapes or {k: v.shape for k, v in net.init_params().items()}
        self.factors = nn.ParameterDict()
        for n in self._adapted:
            shape = shapes[n]
            dims = [shape[0]] + ([shape[1]] if len(shape) > 1 else []) + ([math.prod(shape[2:])] if len(shape) > 2 else [])
            for tag, d in zip(("o", "i", "f"), dims):
                self.factors[f"{_key(n)}_{tag}"] = nn.Parameter(torch.eye(d))

    def direction(self, name: str, grad: torch.Tensor, step: int, ctx: Context, params: Params, loss: torch.Tensor) -> torch.Tensor:
        k = _key(name)
        m_o = self.factors[f"{k}_o"]
        if grad.ndim == 1:
            return m_o @ grad
        if grad.ndim == 2:
            return m_o @ grad @ self.factors[f"{k}_i"].T
        o, i = grad.shape[:2]
        g = (m_o @ grad.reshape(o, -1)).reshape(o, i, -1)  # x_1 M_o
        g = torch.matmul(self.factors[f"{k}_i"], g)  # x_2 M_i: (i, i) @ (o, i, f)
        g = g @ self.factors[f"{k}_f"].T  # x_3 M_f
        return g.reshape(grad.shape)


class MetaLSTM(UpdateRule):
    """Meta-LSTM (Ravi and Larochelle 2017), coordinate-wise: ``theta_t = f_t * theta_{t-1} - i_t * grad``
    with ``i_t = sigmoid(W_I [grad, loss, theta_{t-1}, i_{t-1}] + b_I)`` and ``f_t`` alike, gate
    weights shared by all coordinates. Initialised so that ``i = alpha`` and ``f ~ 1`` (plain SGD)."""

    name = "metalstm"
    stackable = False  # its gates read the task's own loss

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01) -> None:
        super().__init__(net, steps, alpha)
        self.w_i = nn.Parameter(torch.zeros(4))
        self.b_i = nn.Parameter(torch.tensor(math.log(alpha / (1 - alpha))))
        self.w_f = nn.Parameter(torch.zeros(4))
        self.b_f = nn.Parameter(torch.tensor(8.0))

    def update(self, step, params, grads, extra_grads, loss, ctx):
        new = dict(params)
        prev = ctx.setdefault("gates", {})
        for name, g in grads.items():
            theta = params[name]
            i_prev, f_prev = prev.get(name, (torch.sigmoid(self.b_i).expand_as(theta), torch.sigmoid(self.b_f).expand_as(theta)))
            lv = loss.expand_as(theta)
            i_t = torch.sigmoid(self.w_i[0] * g + self.w_i[1] * lv + self.w_i[2] * theta + self.w_i[3] * i_prev + self.b_i)
            f_t = torch.sigmoid(self.w_f[0] * g + self.w_f[1] * lv + self.w_f[2] * theta + self.w_f[3] * f_prev + self.b_f)
            new[name] = f_t * theta - i_t * g
            prev[name] = (i_t, f_t)
        return new, ctx


class ContextualGradientScaling(UpdateRule):
    """CxGrad (Lee et al., Algorithms 1-2). A context ``nu in R^100`` (zeros for every task) feeds
    ``g_phi = Linear(100,100)-ReLU-Linear(100,L)-Softplus`` giving one factor ``gamma_l`` per backbone
    conv layer. Implicit gradient scaling (Algorithm 2, eq. 6): ``W_l <- gamma_l W_l / ||W_l||`` (conv
    weights only; Frobenius norm, no epsilon, as the authors' code). BatchNorm makes the output
    invariant (eq. 4) while the gradient norm of ``W_l`` is multiplied by ``||W_l|| / gamma_l``
    (eq. 5). Per task: one update of ``nu`` from the support loss before the loop (no second-order
    graph), then at each step: scale, one gradient w.r.t. (theta, nu), ``theta -= alpha g_theta``,
    ``nu -= beta g_nu`` (eq. 7).

    ``head_alpha`` (default ``alpha``, as the authors' code) is the step size of the linear head alone. IGS
    rescales the conv layers only, so their effective step is ``alpha`` over ``gamma_l^2`` (eq. 5) and
    ``g_phi`` learns it, while the head's step is ``alpha`` itself; with a shared head (any number of
    classes) that step is what separates the classes' rows, and a larger one (MAML's 0.1 on Omniglot)
    keeps many-way tasks within reach of five inner steps (RESULTS.md, issue 16)."""

    name = "cxgrad"

    def __init__(
        self, net: MetaConv4, steps: int, alpha: float = 0.01, beta: float = 1.0, context_dim: int = 100, head_alpha: float = 0.0
    ) -> None:
        super().__init__(net, steps, alpha, head_alpha)
        self.beta, self.context_dim = beta, context_dim
        self.conv_names = list(net.conv_names)
        self.g_phi = nn.Sequential(
            nn.Linear(context_dim, context_dim), nn.ReLU(), nn.Linear(context_dim, len(self.conv_names)), nn.Softplus()
        )

    @torch.no_grad()
    def start_at(self, params: Params) -> None:
        """``g_phi(0)`` set to the norms of the adapted conv weights of ``params`` (through the last layer's
        bias): IGS then leaves a pretrained backbone's weights as they are and the first inner step is
        MAML's at the same ``alpha``; meta-training moves the scales from there."""
        hidden = torch.relu(cast(nn.Linear, self.g_phi[0]).bias)
        last = cast(nn.Linear, self.g_phi[2])
        norms = torch.stack([params[n].norm() for n in self.conv_names]).to(last.bias)
        softplus_inverse = norms + torch.log(-torch.expm1(-norms))
        last.bias.copy_(softplus_inverse - last.weight @ hidden)

    def scale(self, params: Params, nu: torch.Tensor) -> Params:
        """Algorithm 2 (IGS): the conv weights rescaled to norms ``g_phi(nu)`` (eq. 8). Stacked tasks
        (``nu`` ``(T, 100)``, weights ``(T, O, I, k, k)``) each get their own norms and factors."""
        gamma = self.g_phi(nu)
        out = dict(params)
        for l, name in enumerate(self.conv_names):
            w = params[name]
            if nu.ndim == 1:
                out[name] = gamma[l] * w / w.norm()
            else:
                per_task = (-1,) + (1,) * (w.ndim - 1)
                out[name] = gamma[:, l].view(per_task) * w / w.flatten(1).norm(dim=1).view(per_task)
        return out

    def begin(self, params: Params, support_loss: LossFn) -> Context:
        ref = next(iter(self.g_phi.parameters()))
        tasks = params[self.conv_names[0]].shape[:-4]  # () for one task, (T,) for stacked tasks
        nu = torch.zeros(*tasks, self.context_dim, device=ref.device, dtype=ref.dtype, requires_grad=True)
        loss = support_loss(self.scale(params, nu), 0)
        (g_nu,) = torch.autograd.grad(loss, [nu])  # no second-order graph (authors' code)
        return {"nu": (nu - self.beta * g_nu).detach().requires_grad_(True)}

    def effective(self, params: Params, ctx: Context, step: int) -> Params:
        return self.scale(params, ctx["nu"])

    def extra(self, ctx: Context) -> list[torch.Tensor]:
        return [ctx["nu"]]

    def update(self, step, params, grads, extra_grads, loss, ctx):
        new, _ = super().update(step, params, grads, [], loss, ctx)
        nu = ctx["nu"] - self.beta * extra_grads[0]
        return new, {"nu": nu if nu.requires_grad else nu.requires_grad_(True)}


class TaskContextScaling(ContextualGradientScaling):
    """CxGrad with a context that carries the task (issue 33). In the paper's formulation the context
    ``nu`` is updated by the gradient of the support loss, which BatchNorm (or frozen statistics in units
    of the weight norm) makes zero (eq. 4): ``nu`` never leaves 0 and ``g_phi`` learns one fixed scale per
    layer. Here ``g_phi`` reads quantities of the task that are not zero and do not depend on the IGS
    rescaling, as ALFA's generator reads gradients and weights: the support loss and, per adapted conv
    layer, ``log(||dL/dW_l|| * ||W_l||)`` (invariant to the scale of ``W_l``), measured before the loop and
    after every step (no second-order graph through them, as the authors' ``nu`` update).
    ``g_phi = Linear(L+1, 100)-ReLU-Linear(100, L)-Softplus``; scaling as CxGrad (Algorithm 2)."""

    name = "cxgrad-task"
    stackable = False  # the context is read from each task's own loss and gradients

    def __init__(self, net: MetaConv4, steps: int, alpha: float = 0.01, beta: float = 1.0, head_alpha: float = 0.0) -> None:
        super().__init__(net, steps, alpha, beta, head_alpha=head_alpha)
        layers = len(self.conv_names)
        self.context_dim = layers + 1
        self.g_phi = nn.Sequential(nn.Linear(layers + 1, 100), nn.ReLU(), nn.Linear(100, layers), nn.Softplus())

    @torch.no_grad()
    def start_at(self, params: Params) -> None:
        """``g_phi`` constant at the norms of ``params``' adapted convs (its last weights zeroed): the first
        steps are MAML's; meta-training makes the scales depend on the context from there."""
        cast(nn.Linear, self.g_phi[2]).weight.zero_()
        super().start_at(params)

    def _context(self, loss: torch.Tensor, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        invariant = [torch.log(g.norm() * w.norm() + 1e-12) for g, w in zip(grads, weights)]
        return torch.stack([loss.reshape(()), *invariant]).detach().to(next(self.g_phi.parameters()))

    def begin(self, params: Params, support_loss: LossFn) -> Context:
        weights = [params[n] for n in self.conv_names]
        loss = support_loss(params, 0)
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        return {"nu": self._context(loss, weights, list(grads))}

    def extra(self, ctx: Context) -> list[torch.Tensor]:
        return []

    def update(self, step, params, grads, extra_grads, loss, ctx):
        new, _ = UpdateRule.update(self, step, params, grads, [], loss, ctx)
        return new, {"nu": self._context(loss, [params[n] for n in self.conv_names], [grads[n] for n in self.conv_names])}


def _key(name: str) -> str:
    return name.replace(".", "__")


RULES: dict[str, type[UpdateRule]] = {
    "maml": UpdateRule,
    "fomaml": UpdateRule,
    "metasgd": MetaSGD,
    "mamlpp": MAMLPlusPlus,
    "boil": BOIL,
    "metacurvature": MetaCurvature,
    "metalstm": MetaLSTM,
    "cxgrad": ContextualGradientScaling,
    "cxgrad-task": TaskContextScaling,
    "maml-lslr": LearnedLayerSteps,
}


def build_rule(method: str, net: MetaConv4, steps: int, alpha: float, beta: float = 1.0, head_alpha: float = 0.0) -> UpdateRule:
    """The update rule of ``method`` (one of :data:`RULES`); ``head_alpha`` (CxGrad, MAML, MAML-LSLR; 0: ``alpha``)."""
    if method not in RULES:
        raise ConfigError(f"unknown method {method!r}: use one of {', '.join(RULES)}")
    if method == "cxgrad":
        return ContextualGradientScaling(net, steps, alpha, beta, head_alpha=head_alpha)
    if method == "cxgrad-task":
        return TaskContextScaling(net, steps, alpha, beta, head_alpha=head_alpha)
    if method in ("maml", "fomaml"):
        return UpdateRule(net, steps, alpha, head_alpha)
    if method == "maml-lslr":
        return LearnedLayerSteps(net, steps, alpha, head_alpha)
    return RULES[method](net, steps, alpha)
