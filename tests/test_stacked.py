"""Many inner-loop tasks in one call (stacked weights): merged Classify equals per-task Classify,
batched Adapt equals sequential Adapt, for every rule that stacks, on real Omniglot tasks."""

import pytest
import torch

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import open_shipped
from fewshot.models.inner_loop.engine import InnerLoopAdapter
from fewshot.models.inner_loop.network import MetaConv4
from fewshot.models.inner_loop.rules import build_rule
from fewshot.models.inner_loop.stacked import StackedClassify, bucket, stack, stacked_forward
from fewshot.models.preprocess import InputSpec
from fewshot.models.zoo import load_model

pytestmark = pytest.mark.unit

SPEC = InputSpec.for_dataset("omniglot")


@pytest.fixture(scope="module")
def episodes(omniglot_test):
    sampler = EpisodeSampler(omniglot_test, 5, 1, 3, seed=5)
    out = []
    for i in range(6):
        ep = sampler.episode(i)
        out.append(
            (
                SPEC.normalize(omniglot_test.images[ep.support]),
                torch.as_tensor(ep.support_labels),
                SPEC.normalize(omniglot_test.images[ep.query]),
            )
        )
    return out


@pytest.fixture(scope="module")
def cxgrad():
    return open_shipped(load_model("omniglot-conv4-cxgrad"), "onnxruntime", "cpu")


def _params(net: MetaConv4, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = net.init_params(g)
    p["head.weight"] = torch.randn(p["head.weight"].shape, generator=g) * 0.1
    return p


@pytest.mark.parametrize("per_step_bn", [0, 3])
def test_stacked_forward_equals_one_forward_per_task(episodes, per_step_bn):
    net = MetaConv4(1, 16, 28, 5, per_step_bn=per_step_bn)
    params = [_params(net, seed) for seed in range(4)]
    x = torch.stack([q for _, _, q in episodes[:4]])
    for frozen in (False, True):
        stats = None
        if frozen:  # per task (T, O) statistics of its own support set
            recorded = []
            stacked_forward(net, stack(params), torch.stack([s for s, _, _ in episodes[:4]]), None, 2, record=recorded)
            stats = recorded
        out = stacked_forward(net, stack(params), x, stats, step=2)
        for t, p in enumerate(params):
            mine = [(m[t], v[t]) for m, v in stats] if stats else None
            torch.testing.assert_close(out[t], net.forward(p, x[t], mine, step=2), rtol=1e-5, atol=1e-5)


def test_merged_classify_of_different_tasks_equals_per_task_classify(cxgrad, episodes):
    """Shipped CxGrad model, support BatchNorm: the tasks' own classify runs network.onnx in ONNX
    Runtime one task at a time; the merged call runs them as one stacked torch call, with requests of
    1, 2 and 3 queries padded to one length."""
    adapter = cxgrad.adapter(bn_mode="support")
    tasks = [adapter.adapt(s, y) for s, y, _ in episodes[:4]]
    queries = [q[: 1 + t % 3] for t, (_, _, q) in enumerate(episodes[:4])]
    merger = StackedClassify(cxgrad.net)
    merged = merger.run_many([(task.state, q, task.open_set.calibrate) for task, q in zip(tasks, queries)])
    for task, q, logits in zip(tasks, queries, merged):
        probs = torch.softmax(logits, dim=1)
        assert probs.shape == (len(q), 5)
        # a prototype head's biases -||m_c||^2 are in the hundreds: the two engines' float32 sums round apart
        torch.testing.assert_close(probs, task.classify(q), rtol=0, atol=5e-5)
        assert torch.equal(probs.argmax(1), task.classify(q).argmax(1))


def test_a_plan_merges_only_support_mode_requests_of_at_most_16_queries(cxgrad, episodes):
    support, labels, query = episodes[0]
    cxgrad.merge_tasks(True)
    try:
        frozen = cxgrad.adapter(bn_mode="support").adapt(support, labels)
        transductive = cxgrad.adapter(bn_mode="transductive").adapt(support, labels)
        key, item, run_many = frozen.plan().group(query[:3])
        assert key[-1] == bucket(3) == 4 and run_many([item])[0].shape == (3, 5)
        assert frozen.plan().group(torch.zeros(17, 1, 28, 28)) is None  # big requests amortise their own call
        assert transductive.plan().group is None  # its statistics are the call's own
    finally:
        cxgrad.merge_tasks(False)
    assert cxgrad.adapter(bn_mode="support").adapt(support, labels).plan().group is None


@pytest.mark.parametrize(
    "method,head_init",
    [
        ("maml", "learned"),
        ("mamlpp", "learned"),
        ("metasgd", "learned"),
        ("boil", "learned"),
        ("cxgrad", "learned"),
        ("maml", "shared"),
        ("cxgrad", "shared"),
    ],
)
@pytest.mark.parametrize("bn_mode", ["support", "transductive"])
def test_batched_adapt_equals_sequential_adapt(episodes, method, head_init, bn_mode):
    net = MetaConv4(1, 16, 28, 5, per_step_bn=3 if method == "mamlpp" else 0)
    torch.manual_seed(0)  # the rule's own initial parameters (CxGrad's g_phi)
    rule = build_rule(method, net, 3, alpha=0.1).eval()
    adapter = InnerLoopAdapter(net, rule, _params(net, 1), 3, bn_mode, head_init=head_init)
    supports, labels = [s for s, _, _ in episodes], [y for _, y, _ in episodes]
    assert adapter.stacks([tuple(s.shape) for s in supports])
    batched = adapter.adapt_many(supports, labels)
    for (s, y, q), task in zip(episodes, batched):
        alone = adapter.adapt(s, y)
        # the stacked (grouped) and per-task convolutions sum in different orders; three steps at lr 0.1 carry
        # those float32 roundings into the logits (1.3e-4 measured on CI's CPU), and CxGrad's per-layer context
        # scale amplifies them (7e-4 measured): the shipped-model test below allows the same 2e-3
        torch.testing.assert_close(task.logits(q), alone.logits(q), rtol=1e-2, atol=2e-3)
        assert task.support_losses == pytest.approx(alone.support_losses, rel=1e-4, abs=1e-5)
        for name, value in alone.params.items():
            torch.testing.assert_close(task.params[name], value, rtol=1e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in task.params.values()}
        assert len(held) == 1 and sum(held.values()) == sum(t.nbytes for t in alone.params.values()) + sum(
            m.nbytes + v.nbytes for m, v in alone.bn_stats or []
        )  # one buffer of its own, not a view of the stack


def test_batched_adapt_of_the_shipped_cxgrad_model_equals_sequential(cxgrad, episodes):
    adapter = cxgrad.adapter(bn_mode="support")
    supports, labels = [s for s, _, _ in episodes[:3]], [y for _, y, _ in episodes[:3]]
    for task, (s, y, q) in zip(adapter.adapt_many(supports, labels), episodes):
        # stacked convolutions sum in another order, and the shipped CxGrad's shared-head loop (uniform start,
        # then the context step) amplifies that rounding: same answers, probabilities to 2e-3 (9e-4 measured)
        got, alone = task.classify(q), adapter.adapt(s, y).classify(q)
        assert torch.equal(got.argmax(1), alone.argmax(1))
        torch.testing.assert_close(got, alone, rtol=0, atol=2e-3)


def test_rules_that_do_not_stack_and_mixed_shapes_adapt_one_by_one(episodes):
    net = MetaConv4(1, 8, 28, 5)
    rule = build_rule("metacurvature", net, 2, alpha=0.1).eval()
    adapter = InnerLoopAdapter(net, rule, _params(net, 2), 2, "support")
    assert not adapter.stacks([(5, 1, 28, 28)] * 2)
    (s0, y0, q0), (s1, y1, _) = episodes[:2]
    tasks = adapter.adapt_many([s0, s1], [y0, y1])
    torch.testing.assert_close(tasks[0].logits(q0), adapter.adapt(s0, y0).logits(q0))
    maml = InnerLoopAdapter(net, build_rule("maml", net, 2, 0.1), _params(net, 2), 2, "support")
    assert not maml.stacks([(5, 1, 28, 28), (10, 1, 28, 28)])  # 5-way 1-shot with 5-way 2-shot
    two_shot = torch.cat([s0, s1]), torch.cat([y0, y1])
    mixed = maml.adapt_many([s0, two_shot[0]], [y0, two_shot[1]])
    torch.testing.assert_close(mixed[1].logits(q0), maml.adapt(*two_shot).logits(q0))


def test_bfloat16_inner_loop_agrees_with_float32_and_is_refused_without_native_support(cxgrad, episodes, monkeypatch):
    """``--inner-precision bfloat16``: the inner loop under autocast, weights and frozen statistics in
    float32; on a CPU without native bfloat16 the setting is refused with what to use instead."""
    from fewshot.errors import ConfigError
    from fewshot.models.inner_loop import family as inner_family

    if not inner_family.bfloat16_supported():
        with pytest.raises(ConfigError, match="use float32"):
            cxgrad.adapt_in(torch.bfloat16)
        pytest.skip("this CPU has no native bfloat16: the refusal is what there is to test")
    cxgrad.adapt_in(torch.bfloat16)
    try:
        half = cxgrad.adapter(bn_mode="support")
        assert cxgrad.describe(half)["inner_precision"] == "bfloat16"
        pairs = [(half.adapt(s, y), q) for s, y, q in episodes]
    finally:
        cxgrad.adapt_in(torch.float32)
    full = cxgrad.adapter(bn_mode="support")
    agree = total = 0
    for (task, q), (s, y, _) in zip(pairs, episodes):
        assert all(t.dtype == torch.float32 for t in task.state.params.values())
        agree += int((task.classify(q).argmax(1) == full.adapt(s, y).classify(q).argmax(1)).sum())
        total += len(q)
    assert agree / total >= 0.9  # BENCHMARKS.md: 100% on Omniglot over 750 queries
    monkeypatch.setattr(inner_family, "bfloat16_supported", lambda: False)
    with pytest.raises(ConfigError, match="needs a CPU with native bfloat16"):
        cxgrad.adapt_in(torch.bfloat16)
