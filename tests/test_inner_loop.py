"""The gradient inner-loop engine and its update rules, on real Omniglot tasks."""

import pytest
import torch
import torch.nn.functional as F

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.inner_loop.engine import InnerLoopAdapter, inner_loop
from fewshot.models.inner_loop.network import MetaConv4, support_statistics
from fewshot.models.inner_loop.rules import RULES, ContextualGradientScaling, UpdateRule, build_rule
from fewshot.models.inner_loop.training import MetaTrainConfig, build_learner, query_loss
from fewshot.models.preprocess import InputSpec

pytestmark = pytest.mark.unit

SPEC = InputSpec.for_dataset("omniglot")


@pytest.fixture(scope="module")
def task(omniglot_test):
    ep = EpisodeSampler(omniglot_test, 5, 1, 15, seed=11).episode(0)
    return (
        SPEC.normalize(omniglot_test.images[ep.support]),
        torch.as_tensor(ep.support_labels),
        SPEC.normalize(omniglot_test.images[ep.query]),
        torch.as_tensor(ep.query_labels),
    )


def _trained_like(net: MetaConv4, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {k: v.to(dtype) for k, v in net.init_params(g).items()}
    p["head.weight"] = torch.randn(p["head.weight"].shape, generator=g, dtype=dtype) * 0.1
    return p


def test_implicit_gradient_scaling_keeps_output_and_scales_gradient_norms(task):
    xs, ys, _, _ = task
    net = MetaConv4(1, 32, 28, 5)
    rule = ContextualGradientScaling(net, 5).double()
    params = {k: v.requires_grad_(True) for k, v in _trained_like(net, dtype=torch.float64).items()}
    nu = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scaled = rule.scale(params, nu)
    scaled = {k: (v.detach().requires_grad_(True) if k in net.conv_names else v) for k, v in scaled.items()}
    x = xs.double()
    out, out_scaled = net.forward(params, x), net.forward(scaled, x)
    assert (out - out_scaled).abs().max() < 1e-5  # eq. (4)
    g = torch.autograd.grad(F.cross_entropy(out, ys), [params[n] for n in net.conv_names])
    g_scaled = torch.autograd.grad(F.cross_entropy(out_scaled, ys), [scaled[n] for n in net.conv_names])
    gamma = rule.g_phi(nu).detach()
    for l, name in enumerate(net.conv_names):
        expected = params[name].norm() / gamma[l]  # eq. (5): ratio ||W_l|| / gamma_l
        assert torch.isclose(g_scaled[l].norm() / g[l].norm(), expected, rtol=1e-4), name


def test_second_order_meta_gradient_matches_finite_differences(omniglot_test):
    torch.manual_seed(0)
    net = MetaConv4(1, 3, 16, 2)
    ep = EpisodeSampler(omniglot_test, 2, 2, 3, seed=4).episode(0)
    small = torch.nn.functional.interpolate(SPEC.normalize(omniglot_test.images), size=16, mode="bilinear").double()
    xs, ys = small[ep.support], torch.as_tensor(ep.support_labels)
    xq, yq = small[ep.query], torch.as_tensor(ep.query_labels)
    for method in ("maml", "cxgrad"):
        rule = build_rule(method, net, 2, alpha=0.1).double()
        base = _trained_like(net, seed=2, dtype=torch.float64)

        def meta_loss(p):
            ad = inner_loop(net, rule, p, xs, ys, 2, create_graph=True)
            return F.cross_entropy(net.forward(ad.params, xq), yq)

        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        grads = torch.autograd.grad(meta_loss(params), list(params.values()))
        direction = {k: torch.randn_like(v) for k, v in base.items()}
        analytic = sum((g * direction[k]).sum() for g, k in zip(grads, params))
        eps = 1e-6
        plus = meta_loss({k: (v + eps * direction[k]).requires_grad_(True) for k, v in base.items()})
        minus = meta_loss({k: (v - eps * direction[k]).requires_grad_(True) for k, v in base.items()})
        numeric = (plus - minus) / (2 * eps)
        assert abs(float(analytic.detach() - numeric.detach())) / abs(float(numeric.detach())) < 1e-3, method


def test_engine_maml_equals_hand_written_loop(task):
    xs, ys, _, _ = task
    net = MetaConv4(1, 64, 28, 5)
    params = _trained_like(net)
    rule = UpdateRule(net, 5, alpha=0.4)
    engine = inner_loop(net, rule, params, xs, ys, 5).params
    names = net.conv_names + net.head_names
    manual = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(5):
        loss = F.cross_entropy(net.forward(manual, xs), ys)
        grads = torch.autograd.grad(loss, [manual[n] for n in names])
        manual = dict(manual) | {n: (manual[n] - 0.4 * g).detach().requires_grad_(True) for n, g in zip(names, grads)}
    for k in params:
        assert (engine[k] - manual[k]).abs().max() < 1e-6, k


def test_the_reference_loop_equals_the_engine(task):
    """The plain reference loop (`models/inner_loop/reference.py`: its own Conv-4, autograd.grad,
    theta -= alpha g), which `fewshot bench --compare` times the engine against: both adapt to the same
    weights and support statistics, so the timing is of the same computation."""
    from fewshot.models.inner_loop.reference import reference_forward, reference_maml

    xs, ys, xq, _ = task
    net = MetaConv4(1, 32, 28, 5)
    params = _trained_like(net, seed=3)
    state = InnerLoopAdapter(net, UpdateRule(net, 5, alpha=0.4), params, 5, "support").adapt(xs, ys)
    ref_params, ref_stats = reference_maml(params, xs, ys, 5, 0.4, net.bn_eps)
    with torch.no_grad():
        assert (reference_forward(ref_params, xq, ref_stats, net.bn_eps) - state.logits(xq)).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["omniglot-conv4-maml", "omniglot-conv4-cxgrad", "tinyimagenet-conv4-maml", "tinyimagenet-conv4-cxgrad"])
def test_the_fast_inner_loop_equals_the_plain_one_for_every_shipped_model(name, exported):
    """The served inner loop of each shipped model (its stem in ONNX Runtime from the bundle's stem.onnx, run
    once; the first adapted convolution as a matrix product over the stem's patches; only the adapted tensors
    tracked) against the plain reference loop (MAML or CxGrad written out, the whole network on the images at
    every step, convolutions as convolutions) and against the engine on the torch stem: the same adapted
    weights within 1e-5 and the same predictions on the task's queries."""
    from fewshot.export.loader import open_bundle
    from fewshot.export.registry import Registry
    from fewshot.models.data import load_dataset
    from fewshot.models.inner_loop.engine import InnerLoopAdapter as Engine
    from fewshot.models.inner_loop.reference import reference_adapt
    from fewshot.tools.compare import reference_settings

    model = open_bundle(Registry.load(exported[0]).get(name), "cpu")
    assert model.stem is not None, "the bundle's stem.onnx is what the served loop runs"
    data = load_dataset(model.manifest["data"]["dataset"], "test")
    settings = reference_settings(model)
    assert settings is not None
    fast = model.adapter().adapter
    torch_stem = Engine(fast.net, fast.rule, fast.meta_params, fast.steps, fast.bn_mode, head_init=fast.head_init)
    for i in range(2):
        ep = EpisodeSampler(data, 5, 5, 15, seed=i).episode(0)
        xs, ys = model.spec.normalize(data.images[ep.support]), torch.as_tensor(ep.support_labels)
        xq = model.spec.normalize(data.images[ep.query])
        served, plain = fast.adapt(xs, ys), torch_stem.adapt(xs, ys)
        ref, _ = reference_adapt(model.params, xs, ys, **settings)
        for k in ("conv3.weight", "head.weight", "head.bias"):
            assert (served.params[k] - ref[k]).abs().max() < 1e-5, (name, k)
            assert (served.params[k] - plain.params[k]).abs().max() < 1e-5, (name, k)
        labels = served.logits(xq).argmax(1)
        assert torch.equal(labels, plain.logits(xq).argmax(1))
        assert (labels == torch.as_tensor(ep.query_labels)).float().mean() > 0.5  # a real task, answered well


@pytest.mark.parametrize(
    "method,bn_train,first_order",
    [(m, "transductive", m == "fomaml") for m in sorted(RULES)] + [("cxgrad", "support", False), ("cxgrad", "support", True)],
)
def test_every_rule_meta_trains_on_real_episodes(method, bn_train, first_order, task):
    torch.manual_seed(0)
    xs, ys, xq, yq = task
    cfg = MetaTrainConfig(method=method, ways=5, inner_steps=2, alpha=0.1, width=16, iterations=50, bn_train=bn_train)
    net, rule = build_learner(cfg, SPEC)
    meta = {k: torch.nn.Parameter(v) for k, v in net.init_params(torch.Generator().manual_seed(0)).items()}
    opt = torch.optim.Adam(list(meta.values()) + list(rule.parameters()), lr=1e-2)
    second_order = not first_order

    def loss_now(iteration):
        ad = inner_loop(net, rule, meta, xs, ys, cfg.inner_steps, create_graph=second_order)
        return query_loss(net, cfg, ad, xs, xq, yq, iteration)

    first = float(loss_now(0).detach())
    for it in range(50):
        opt.zero_grad()
        loss_now(it).backward()
        opt.step()
    last = float(loss_now(50).detach())
    assert last < first * 0.8, (method, first, last)


def test_support_batchnorm_query_is_batch_invariant(task):
    xs, ys, xq, _ = task
    net = MetaConv4(1, 32, 28, 5)
    for method in ("maml", "cxgrad"):
        adapter = InnerLoopAdapter(net, build_rule(method, net, 3, 0.1), _trained_like(net), 3, bn_mode="support")
        state = adapter.adapt(xs, ys)
        together = state.logits(xq)
        assert together.shape == (75, 5)
        alone = torch.cat([state.logits(xq[i : i + 1]) for i in range(75)])
        # identical up to float32 rounding (oneDNN picks different conv kernels per batch size)
        assert (together - alone).abs().max() < 1e-5
        assert torch.equal(together.argmax(1), alone.argmax(1))
        # the paper's transductive mode is not batch invariant
        trans = InnerLoopAdapter(net, build_rule(method, net, 3, 0.1), _trained_like(net), 3, bn_mode="transductive").adapt(xs, ys)
        assert not torch.allclose(trans.logits(xq)[:5], trans.logits(xq[:5]))


def test_adapter_rejects_wrong_way_count(task):
    """A learned head (``head_init="learned"``, bundles packaged before issue 16) has one row per training
    way: a task of another number of classes is refused with the number it takes."""
    xs, _, _, _ = task
    net = MetaConv4(1, 8, 28, 5)
    adapter = InnerLoopAdapter(net, build_rule("maml", net, 1, 0.1), net.init_params(), 1)
    with pytest.raises(ValueError, match="5-way"):
        adapter.adapt(xs[:3], torch.tensor([0, 1, 2]))


def test_trained_support_batchnorm_equals_served_support_batchnorm(task):
    """Meta-training's differentiable support statistics (folded into one affine map per channel) give the
    logits of the frozen statistics the server uses, and carry gradients to the support set's parameters."""
    xs, _, xq, _ = task
    net = MetaConv4(1, 32, 28, 5)
    params = {k: v.requires_grad_() for k, v in _trained_like(net).items()}
    trained = net.forward(params, xq, support_statistics(net, params, xs, differentiable=True))
    served = net.forward({k: v.detach() for k, v in params.items()}, xq, support_statistics(net, params, xs))
    assert (trained.detach() - served).abs().max() < 1e-4 * served.abs().max()
    grads = torch.autograd.grad(trained.logsumexp(1).sum(), [params["conv0.weight"], params["bn3.weight"]])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_prototype_head_is_minus_the_squared_distance_and_adapts_any_number_of_classes(omniglot_test):
    """Proto-MAML's head: logits -||h - m_c||^2 up to a per-query constant, so before any step the task
    is nearest centroid on the body's features; with it a 5-way-trained network adapts 2-, 3- and 7-way tasks."""
    from fewshot.models.inner_loop.engine import prototype_head

    net = MetaConv4(1, 8, 28, 5)
    params = _trained_like(net)
    for ways in (2, 3, 7):
        ep = EpisodeSampler(omniglot_test, ways, 2, 3, seed=ways).episode(0)
        xs, ys = SPEC.normalize(omniglot_test.images[ep.support]), torch.as_tensor(ep.support_labels)
        head = prototype_head(net, params, xs, ys)
        assert head["head.weight"].shape == (ways, net.feature_dim) and head["head.bias"].shape == (ways,)
        h = net.features(params, xs)
        means = torch.stack([h[ys == c].mean(0) for c in range(ways)])
        logits = net.forward(head, xs)
        distance = -((h[:, None] - means[None]) ** 2).sum(-1)
        torch.testing.assert_close(logits - logits[:, :1], distance - distance[:, :1], rtol=1e-4, atol=1e-3)
        task = InnerLoopAdapter(net, build_rule("cxgrad", net, 2, 0.1), params, 2, head_init="prototypes").adapt(xs, ys)
        xq = SPEC.normalize(omniglot_test.images[ep.query])
        assert task.classify(xq).shape == (len(xq), ways)
    with pytest.raises(ValueError, match="head initialisation"):
        InnerLoopAdapter(net, build_rule("maml", net, 1, 0.1), params, 1, head_init="zeros")
    with pytest.raises(ValueError, match="head-init"):
        MetaTrainConfig(head_init="zeros")


def test_a_shared_head_starts_uniform_and_adapts_any_number_of_classes(omniglot_test):
    """Ye and Chao's single row replicated per class: every task starts at the uniform prediction (support
    loss log N at the first step, where a 1-shot prototype head starts near 0), the inner loop separates
    the classes, and the meta-gradient reaches the one stored row."""
    net = MetaConv4(1, 8, 28, 5)
    params = {k: v.requires_grad_(True) for k, v in _trained_like(net).items()}
    for ways in (3, 7):
        ep = EpisodeSampler(omniglot_test, ways, 1, 2, seed=ways).episode(0)
        xs, ys = SPEC.normalize(omniglot_test.images[ep.support]), torch.as_tensor(ep.support_labels)
        ad = inner_loop(net, build_rule("maml", net, 3, 0.1), params, xs, ys, 3, create_graph=True, head_init="shared")
        assert ad.params["head.weight"].shape == (ways, net.feature_dim)
        assert ad.losses[0] == pytest.approx(float(torch.log(torch.tensor(ways))), rel=1e-4)
        assert float(F.cross_entropy(net.forward(ad.params, xs), ys)) < ad.losses[0]
        xq = SPEC.normalize(omniglot_test.images[ep.query])
        loss = F.cross_entropy(net.forward(ad.params, xq), torch.as_tensor(ep.query_labels))
        grad = torch.autograd.grad(loss, params["head.weight"])[0]
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_cxgrad_head_alpha_steps_the_head_alone(task):
    """``head_alpha`` (issue 16): the head moves by ``head_alpha`` times its gradient, every conv layer
    exactly as with the authors' single ``alpha``; the card's ``inner_loop`` carries it to serving."""
    from fewshot.models.inner_loop.family import inner_loop_model_parts

    xs, ys, _, _ = task
    net = MetaConv4(1, 8, 28, 5)
    params = _trained_like(net)
    same = ContextualGradientScaling(net, 1, alpha=0.01)
    rule = ContextualGradientScaling(net, 1, alpha=0.01, head_alpha=0.05)
    rule.load_state_dict(same.state_dict())
    base = inner_loop(net, same, params, xs, ys, 1, head_init="shared")
    wider = inner_loop(net, rule, params, xs, ys, 1, head_init="shared")
    for name in net.conv_names:
        torch.testing.assert_close(wider.params[name], base.params[name], rtol=0, atol=0)
    start = params["head.weight"].mean(0, keepdim=True).expand(5, -1)
    torch.testing.assert_close(wider.params["head.weight"] - start, 5 * (base.params["head.weight"] - start), rtol=1e-4, atol=1e-7)
    assert ContextualGradientScaling(net, 1, alpha=0.01).step_size("head.weight", 0) == 0.01  # authors' default
    loop = {"steps": 1, "alpha": 0.01, "beta": 1.0, "head_alpha": 0.05}
    tensors = {f"param.{k}": v for k, v in params.items()} | {f"rule.{k}": v for k, v in rule.state_dict().items()}
    _, served, _ = inner_loop_model_parts("cxgrad", net.config, loop, tensors)
    assert served.step_size("head.weight", 0) == 0.05 and served.step_size(net.conv_names[0], 0) == 0.01
    with pytest.raises(Exception, match="--head-alpha applies to --method cxgrad, cxgrad-task, maml, fomaml and maml-lslr only"):
        MetaTrainConfig(method="metasgd", head_alpha=0.1)
    assert build_rule("maml", net, 1, 0.01, head_alpha=0.05).step_size("head.bias", 0) == 0.05  # MAML: the same knob
