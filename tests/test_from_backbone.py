"""Inner-loop networks initialised from a shipped metric backbone (issue 33): the network equals the
backbone, zero inner steps answer as its nearest centroid, frozen statistics keep each conv scale-invariant
(CxGrad eq. 4), and CxGrad's scaling network is meta-trained in every mode the trainer offers."""

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.data import dataset_spec, load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.heads.centroid import CentroidHead
from fewshot.models.inner_loop.engine import InnerLoopAdapter, centroid_head, inner_loop
from fewshot.models.inner_loop.network import MetaConv4
from fewshot.models.inner_loop.rules import TaskContextScaling, build_rule
from fewshot.models.inner_loop.training import MetaTrainConfig, backbone_params, build_learner, query_loss
from fewshot.models.zoo import load_model

pytestmark = pytest.mark.unit

BACKBONES = {"omniglot": "omniglot-conv4-directsum", "tinyimagenet": "tinyimagenet-conv4-sce-nca-directsum"}


def _learner(dataset: str, method: str = "cxgrad", adapt_from: int = 3, shots: int = 1):
    cfg = MetaTrainConfig(
        method=method,
        dataset=dataset,
        ways=5,
        shots=shots,
        bn_train="support",
        head_init="centroid",
        init_backbone=BACKBONES[dataset],
        adapt_from=adapt_from,
        alpha=0.1,
        head_alpha=1.0,
    )
    spec = dataset_spec(dataset)
    net, rule = build_learner(cfg, spec)
    backbone = load_model(BACKBONES[dataset])
    params = backbone_params(net, backbone, cfg.head_temperature)
    rule.start_at(params)
    return cfg, spec, net, rule, params, backbone


@pytest.fixture(scope="module", params=["omniglot", "tinyimagenet"])
def dataset(request):
    return request.param


@pytest.fixture(scope="module")
def episode(dataset):
    spec, test = dataset_spec(dataset), load_dataset(dataset, "test")
    ep = EpisodeSampler(test, 5, 2, 6, seed=3).episode(0)
    return (
        spec.normalize(test.images[ep.support]),
        torch.as_tensor(ep.support_labels),
        spec.normalize(test.images[ep.query]),
        torch.as_tensor(ep.query_labels),
    )


def test_the_network_computes_the_backbones_features_and_stem_plus_tail_is_the_whole(dataset, episode):
    _, _, net, _, params, backbone = _learner(dataset)
    x = torch.cat([episode[0], episode[2]])
    with torch.no_grad():
        expected = backbone.backbone.features(x)
        whole = net.features(params, x)
        split = net.tail().features(params, net.stem(params, x))
    assert whole.shape == expected.shape == (len(x), backbone.card.feature_dim)
    scale = expected.abs().max()
    assert (whole - expected).abs().max() < 1e-5 * scale
    assert (split - whole).abs().max() < 1e-6 * scale


def test_zero_inner_steps_answer_as_the_metric_paths_nearest_centroid(dataset, episode):
    xs, ys, xq, _ = episode
    _, _, net, _, params, backbone = _learner(dataset)
    with torch.no_grad():
        logits = net.forward(centroid_head(net, params, xs, ys), xq)
        f = backbone.backbone.features(torch.cat([xs, xq]))
    head = CentroidHead(backbone.card.heads["centroid"]["transform"], backbone.center)
    metric = head.fit(f[: len(xs)], ys).logits(f[len(xs) :])
    assert torch.equal(logits.argmax(1), metric.argmax(1))
    # the same ranking at temperature tau: logits = tau * metric + a constant per query
    tau = params["head.log_scale"].exp()
    diff = logits - tau * metric
    assert (diff - diff.mean(1, keepdim=True)).abs().max() < 1e-3


def test_frozen_statistics_keep_every_conv_scale_invariant(episode):
    xs, ys, _, _ = episode
    _, _, net, _, params, _ = _learner("omniglot" if xs.shape[1] == 1 else "tinyimagenet", adapt_from=0)
    scaled = {k: (3.7 * v if k.startswith("conv") else v) for k, v in params.items()}
    head = centroid_head(net, params, xs, ys)
    out = net.forward(head, xs)
    out_scaled = net.forward({**scaled, "head.weight": head["head.weight"], "head.bias": head["head.bias"]}, xs)
    assert (out - out_scaled).abs().max() < 1e-4 * out.abs().max()


def test_cxgrad_starts_at_the_backbone_weights_so_its_first_step_is_mamls():
    _, _, net, rule, params, _ = _learner("omniglot", adapt_from=0)
    gamma = rule.g_phi(torch.zeros(rule.context_dim))
    norms = torch.stack([params[n].norm() for n in net.conv_names])
    assert torch.allclose(gamma, norms, rtol=1e-5)
    scaled = rule.scale(params, torch.zeros(rule.context_dim))
    for n in net.conv_names:
        assert torch.allclose(scaled[n], params[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["cxgrad", "cxgrad-task"])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("start", ["scratch", "backbone"])
def test_the_scaling_network_receives_a_meta_gradient_in_every_training_mode(method, second_order, start):
    """g_phi learns through the meta-gradient of the query loss, first- and second-order, from scratch and
    from a backbone (with CxGrad's own context stuck at 0 it still learns the per-layer scales)."""
    test = load_dataset("omniglot", "test")
    spec = dataset_spec("omniglot")
    ep = EpisodeSampler(test, 5, 1, 3, seed=5).episode(0)
    xs, ys = spec.normalize(test.images[ep.support]), torch.as_tensor(ep.support_labels)
    xq, yq = spec.normalize(test.images[ep.query]), torch.as_tensor(ep.query_labels)
    if start == "backbone":
        cfg, _, net, rule, params, _ = _learner("omniglot", method, adapt_from=0)
    else:
        cfg = MetaTrainConfig(method=method, dataset="omniglot", ways=5, shots=1, bn_train="support", width=16)
        net, rule = build_learner(cfg, spec)
        params = net.init_params(torch.Generator().manual_seed(0))
        params["head.weight"] = 0.1 * torch.randn(params["head.weight"].shape, generator=torch.Generator().manual_seed(1))
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    adaptation = inner_loop(net, rule, params, xs, ys, 2, create_graph=second_order, head_init=cfg.head_init)
    query_loss(net, cfg, adaptation, xs, xq, yq, 0).backward()
    grads = [p.grad for p in rule.g_phi.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0


def test_the_task_context_differs_between_tasks_where_cxgrads_stays_at_zero():
    test = load_dataset("omniglot", "test")
    spec = dataset_spec("omniglot")
    _, _, net, cx, params, _ = _learner("omniglot", "cxgrad", adapt_from=0)
    task_rule = TaskContextScaling(net, 3, 0.1, head_alpha=1.0)
    task_rule.start_at(params)
    contexts, nus = [], []
    for i in range(2):
        ep = EpisodeSampler(test, 5, 1, 1, seed=9).episode(i)
        xs, ys = spec.normalize(test.images[ep.support]), torch.as_tensor(ep.support_labels)
        # a 1-shot support set sits on its prototypes: a lower temperature gives the loop a loss to follow
        p = {**params, "head.log_scale": torch.tensor(0.0)}
        contexts.append(inner_loop(net, task_rule, p, xs, ys, 3, head_init="centroid").ctx["nu"])
        nus.append(inner_loop(net, cx, p, xs, ys, 3, head_init="centroid").ctx["nu"])
    assert contexts[0].shape == (len(net.conv_names) + 1,)
    assert (contexts[0] - contexts[1]).abs().max() > 1e-3
    assert max(float(n.detach().abs().max()) for n in nus) < 1e-4  # eq. 4: CxGrad's own context does not move


def test_an_adapter_from_a_backbone_adapts_through_its_stem_and_classifies(episode, dataset):
    xs, ys, xq, yq = episode
    _, _, net, rule, params, _ = _learner(dataset)
    task = InnerLoopAdapter(net, rule, params, 3, "support", head_init="centroid").adapt(xs, ys)
    probs = task.classify(xq)
    assert probs.shape == (len(xq), 5) and torch.allclose(probs.sum(1), torch.ones(len(xq)), atol=1e-5)
    # the adapted network's stored statistics are the frozen ones under its adapted weights
    for (m, v), (fm, fv) in zip(task.bn_stats, net.frozen_statistics(task.params)):
        assert torch.allclose(m, fm) and torch.allclose(v, fv)
    assert float((probs.argmax(1) == yq).float().mean()) > 0.35  # 5 ways: chance is 0.2


def test_options_that_need_a_backbone_are_refused_in_one_line():
    for kwargs in ({"adapt_from": 3}, {"head_init": "centroid"}, {"init_backbone": "omniglot-conv4-directsum", "bn_train": "transductive"}):
        with pytest.raises(ConfigError):
            MetaTrainConfig(method="maml", dataset="omniglot", bn_train=kwargs.pop("bn_train", "support"), **kwargs)
    with pytest.raises(ConfigError):
        MetaConv4(1, 8, 28, 5, adapt_from=2)  # a fixed stem needs frozen statistics
    with pytest.raises(ConfigError, match="width"):
        cfg = MetaTrainConfig(method="maml", dataset="omniglot", bn_train="support", width=32, init_backbone="omniglot-conv4-directsum")
        build_learner(cfg, dataset_spec("omniglot"))
    net = MetaConv4(1, 8, 28, 5)
    with pytest.raises(ConfigError, match="transformed"):
        centroid_head(net, net.init_params(), torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))


def test_maml_with_learned_layer_steps_starts_as_maml_and_learns_its_step_sizes(episode):
    """The fair comparison's third row (MAML-LSLR): its step sizes start at MAML's (``alpha`` for the convs,
    ``head_alpha`` for the head), so before meta-training it adapts exactly as MAML; the query loss gives every
    used step size a meta-gradient, first-order too."""
    xs, ys, xq, yq = episode
    dataset = "omniglot" if xs.shape[1] == 1 else "tinyimagenet"
    cfg, _, net, lslr, params, _ = _learner(dataset, "maml-lslr")
    maml = build_rule("maml", net, 2, 0.1, head_alpha=1.0)
    assert lslr.lrs.shape == (cfg.inner_steps, len(net.conv_names) + len(net.head_names))
    a = inner_loop(net, lslr, params, xs, ys, 2, head_init="centroid").params
    b = inner_loop(net, maml, params, xs, ys, 2, head_init="centroid").params
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    adaptation = inner_loop(net, lslr, params, xs, ys, 2, create_graph=False, head_init="centroid")
    query_loss(net, cfg, adaptation, xs, xq, yq, 0).backward()
    assert lslr.lrs.grad is not None and float(lslr.lrs.grad[:2].abs().sum()) > 0
    with pytest.raises(ConfigError, match="--head-alpha"):
        MetaTrainConfig(method="mamlpp", dataset=dataset, head_alpha=1.0)
