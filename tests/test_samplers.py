"""Batch samplers and scenarios: coverage, label structure, determinism, exact resume, scaling."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.data.datasets import Dataset
from normlab.data.samplers import (
    SAMPLERS,
    BatchSampler,
    KLabelsSampler,
    OnlineSampler,
    ShuffledSampler,
    UnshuffledSampler,
    make_sampler,
)
from normlab.data.scenarios import (
    SCENARIOS,
    Scenario,
    get_scenario,
    list_scenarios,
    random_scale_factors,
    scale_samples,
)

KINDS = ["shuffled", "unshuffled", "k-labels", "online"]


def imbalanced_labels(n: int = 237, num_classes: int = 6, seed: int = 0) -> torch.Tensor:
    """Labels with uneven class sizes, one class of a single sample, in random order."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.1] + [0.0] * (num_classes - 5))
    y = torch.multinomial(probs[:num_classes] / probs.sum(), n - 1, replacement=True, generator=g)
    y = torch.cat([y, torch.tensor([num_classes - 1])])  # class num_classes-1 has one sample
    return y[torch.randperm(n, generator=g)]


def build(
    kind: str, labels: torch.Tensor, batch_size: int = 16, seed: int = 0, **kw
) -> BatchSampler:
    if kind == "online":
        batch_size = 1
    if kind == "k-labels":
        kw.setdefault("k", 2)
    return make_sampler(kind, labels, batch_size=batch_size, seed=seed, **kw)


def epoch_batches(sampler: BatchSampler, epoch: int) -> list[torch.Tensor]:
    sampler.set_epoch(epoch)
    return list(sampler)


def assert_same_batches(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---- every sample exactly once ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [1, 7, 16, 300])
def test_every_sample_exactly_once_per_epoch(kind, batch_size):
    y = imbalanced_labels()
    sampler = build(kind, y, batch_size)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert all(b.dtype == torch.int64 and b.dim() == 1 and len(b) >= 1 for b in batches)
        assert all(len(b) <= (1 if kind == "online" else batch_size) for b in batches)
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(len(y)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    batch_size=st.integers(1, 20),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(KINDS),
)
def test_exactly_once_property(labels, batch_size, k, seed, kind):
    y = torch.tensor(labels)
    sampler = build(kind, y, batch_size, seed, **({"k": k} if kind == "k-labels" else {}))
    batches = epoch_batches(sampler, 1)
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(len(y)))
    limit = {"unshuffled": 1, "k-labels": k}.get(kind)
    if limit is not None:
        assert all(len(torch.unique(y[b])) <= limit for b in batches)
    # a one-sample batch remains only when no batch could give it a sample (size >= 3 and, for
    # single-label batches, holding its label)
    if batch_size >= 3:
        for single in (b for b in batches if len(b) == 1):
            label = y[single[0]]
            donors = [
                b for b in batches if len(b) >= 3 and (limit != 1 or bool((y[b] == label).any()))
            ]
            assert donors == []


def test_shuffled_batch_count_and_sizes():
    sampler = ShuffledSampler(100, 32, seed=3)
    sizes = [len(b) for b in sampler.batches()]
    assert sizes == [32, 32, 32, 4]
    # a remainder of one sample takes a second one from the first largest batch
    odd = ShuffledSampler(97, 32, seed=3)
    assert [len(b) for b in odd.batches()] == [31, 32, 32, 2]
    assert [len(b) for b in ShuffledSampler(97, 2, seed=3).batches()][-1] == 1  # no donor
    dropped = ShuffledSampler(100, 32, seed=3, drop_last=True)
    batches = dropped.batches()
    assert [len(b) for b in batches] == [32, 32, 32]
    flat = torch.cat(batches)
    assert len(torch.unique(flat)) == 96  # each kept sample once
    # drop_last keeps the same permutation's full batches
    assert_same_batches(batches, sampler.batches()[:3])


def test_online_is_a_permutation_of_single_samples():
    sampler = OnlineSampler(50, seed=1)
    batches = sampler.batches()
    assert len(sampler) == 50 and all(b.shape == (1,) for b in batches)
    order = torch.cat(batches)
    assert not torch.equal(order, torch.arange(50))  # random order, not dataset order


# ---- label structure ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16, 64])
def test_unshuffled_batches_are_single_label_blocks(batch_size):
    y = imbalanced_labels()
    sampler = UnshuffledSampler(y, batch_size, seed=0)
    counts = torch.bincount(y)
    expected_blocks = sum(math.ceil(int(c) / batch_size) for c in counts if c > 0)
    assert len(sampler) == expected_blocks
    for epoch in range(2):
        batches = epoch_batches(sampler, epoch)
        for b in batches:
            assert len(torch.unique(y[b])) == 1  # one label only
        # per label: full blocks and the remainder; a remainder of 1 borrows one sample
        for c in range(len(counts)):
            sizes = sorted((len(b) for b in batches if int(y[b[0]]) == c), reverse=True)
            q, r = divmod(int(counts[c]), batch_size)
            expected = [batch_size] * q + ([r] if r else [])
            if r == 1 and q >= 1 and batch_size >= 3:
                expected = [batch_size] * (q - 1) + [batch_size - 1, 2]
            assert sizes == expected


def test_unshuffled_blocks_fixed_but_order_reshuffled():
    y = imbalanced_labels()
    sampler = UnshuffledSampler(y, 8, seed=0)
    e0, e1 = epoch_batches(sampler, 0), epoch_batches(sampler, 1)
    as_set = lambda bs: sorted(tuple(b.tolist()) for b in bs)  # noqa: E731
    assert as_set(e0) == as_set(e1)  # same blocks
    assert [tuple(b.tolist()) for b in e0] != [tuple(b.tolist()) for b in e1]  # other order
    # without block shuffling: label order, dataset order within a label (stable argsort)
    fixed = UnshuffledSampler(y, 8, seed=0, shuffle_blocks=False)
    stable = np.argsort(y.numpy(), kind="stable")
    for epoch in range(2):
        assert np.array_equal(torch.cat(epoch_batches(fixed, epoch)).numpy(), stable)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_labels_at_most_k_classes(k):
    y = imbalanced_labels(n=400, seed=2)
    sampler = KLabelsSampler(y, 16, k, seed=5)
    num_classes = len(torch.unique(y))
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        labels_per_batch = [len(torch.unique(y[b])) for b in batches]
        assert max(labels_per_batch) <= k
        # a short batch empties every class it draws from (at most one per class), plus at most
        # one donor per one-sample batch
        assert sum(len(b) < 16 for b in batches) <= 2 * num_classes
        assert all(len(b) >= 2 for b in batches) or k == 1
    if k >= 2:  # batches really mix classes (not the single-label scenario)
        assert max(labels_per_batch) == k


def test_k_labels_with_k_at_least_num_classes_is_full_batches():
    y = imbalanced_labels(n=200, num_classes=5, seed=4)
    sampler = KLabelsSampler(y, 16, 5, seed=0)
    sizes = [len(b) for b in sampler.batches()]
    assert sizes == [16] * 12 + [8]


def test_label_samplers_reject_regression_targets():
    targets = torch.randn(30, generator=torch.Generator().manual_seed(0))
    for kind in ("unshuffled", "k-labels"):
        with pytest.raises(ValueError, match="integer labels.*regression"):
            build(kind, targets)
    for kind in ("shuffled", "online"):  # only the size is used
        batches = build(kind, targets, 8).batches()
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(30))


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed_and_epoch(kind):
    y = imbalanced_labels()
    a, b, other = build(kind, y, seed=11), build(kind, y, seed=11), build(kind, y, seed=12)
    for epoch in (0, 1, 4):
        assert_same_batches(epoch_batches(a, epoch), epoch_batches(b, epoch))
    cat = lambda bs: torch.cat(bs)  # noqa: E731
    assert not torch.equal(cat(epoch_batches(a, 0)), cat(epoch_batches(a, 1)))
    assert not torch.equal(cat(epoch_batches(a, 0)), cat(epoch_batches(other, 0)))
    # epoch e depends on (seed, e) only, not on the epochs iterated before
    fresh = build(kind, y, seed=11)
    assert_same_batches(fresh.batches(4), epoch_batches(a, 4))


def test_batches_do_not_touch_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    ref_t, ref_n = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    for kind in KINDS:
        build(kind, imbalanced_labels()).batches(2)
    assert torch.equal(torch.rand(3), ref_t) and np.array_equal(np.random.rand(3), ref_n)


# ---- state_dict resume --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stop", [0, 3, "all"])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(kind, stop):
    y = imbalanced_labels()
    reference = build(kind, y, seed=7)
    reference.set_epoch(2)
    full = list(reference)
    stop = len(full) if stop == "all" else stop

    run = build(kind, y, seed=7)
    run.set_epoch(2)
    it = iter(run)
    consumed = [next(it) for _ in range(stop)]
    assert run.position == stop
    state = json.loads(json.dumps(run.state_dict()))  # a checkpoint survives JSON
    assert state["epoch"] == 2 and state["position"] == stop and state["seed"] == 7

    restored = build(kind, y, seed=99)  # seed comes back from the state dict
    restored.load_state_dict(state)
    rest = list(restored)
    assert_same_batches(consumed + rest, full)
    # and the following epoch matches too
    restored.set_epoch(3)
    reference.set_epoch(3)
    assert_same_batches(list(restored), list(reference))


def test_iteration_advances_position_and_continues():
    sampler = ShuffledSampler(40, 8, seed=0)
    full = sampler.batches()
    first = []
    for batch in sampler:
        first.append(batch)
        if len(first) == 2:
            break
    assert sampler.position == 2
    assert_same_batches(first + list(sampler), full)
    assert sampler.position == len(sampler) and list(sampler) == []
    sampler.set_epoch(0)
    assert sampler.position == 0 and len(list(sampler)) == 5


def test_load_state_dict_rejects_mismatch_and_leaves_state():
    y = imbalanced_labels()
    sampler = KLabelsSampler(y, 16, 2, seed=1)
    sampler.set_epoch(1)
    next(iter(sampler))
    before = sampler.state_dict()
    bad = [
        {**before, "kind": "shuffled"},
        {**before, "batch_size": 32},
        {**before, "k": 3},
        {**before, "position": 10_000},
        {k: v for k, v in before.items() if k != "epoch"},
        KLabelsSampler(imbalanced_labels(seed=9), 16, 2).state_dict(),  # other labels
    ]
    for state in bad:
        with pytest.raises(ValueError):
            sampler.load_state_dict(state)
        assert sampler.state_dict() == before


# ---- argument errors ----------------------------------------------------------------------


def test_sampler_argument_errors():
    y = imbalanced_labels()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ShuffledSampler(10, 0)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        KLabelsSampler(y, 4, 0)
    with pytest.raises(ValueError, match="seed"):
        ShuffledSampler(10, 2, seed=-1)
    with pytest.raises(ValueError, match="unknown sampler kind 'bogus'.*shuffled"):
        make_sampler("bogus", y, batch_size=4)
    with pytest.raises(ValueError, match="online.*batch_size 1"):
        make_sampler("online", y, batch_size=4)
    with pytest.raises(ValueError, match="needs k"):
        make_sampler("k-labels", y, batch_size=4)
    with pytest.raises(ValueError, match="no batch"):
        ShuffledSampler(10, 16, drop_last=True)
    assert set(SAMPLERS) == set(KINDS)


# ---- scenarios ----------------------------------------------------------------------------


def test_presets():
    expected = {
        "shuffled": ("shuffled", 64, None),
        "unshuffled": ("unshuffled", 64, None),
        "k-labels": ("k-labels", 64, 3),
        "online": ("online", 1, None),
        "small-batch": ("shuffled", 2, None),
        "scaled": ("shuffled", 16, None),
    }
    assert set(expected) <= set(list_scenarios()) and set(list_scenarios()) == set(SCENARIOS)
    for name, (kind, b, k) in expected.items():
        s = get_scenario(name)
        assert (s.name, s.sampler, s.batch_size, s.k) == (name, kind, b, k)
    assert get_scenario("scaled").scale == (0.1, 10.0)
    assert all(get_scenario(n).scale is None for n in expected if n != "scaled")


def test_overrides_make_new_scenarios():
    s = get_scenario("k-labels", k=2, batch_size=16)
    assert (s.k, s.batch_size, s.sampler) == (2, 16, "k-labels")
    assert get_scenario("k-labels").k == 3  # preset untouched
    t = get_scenario("shuffled", scale=(0.5, 2.0), scale_dist="log-uniform")
    assert t.scale == (0.5, 2.0) and t.label == "shuffled b=64 scale log=[0.5, 2]"
    assert Scenario(**json.loads(json.dumps(t.to_dict()))) == t
    assert get_scenario("k-labels", sampler="shuffled").k is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("nope", {}, "unknown scenario 'nope'; valid scenarios: shuffled"),
        ("shuffled", {"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ("k-labels", {"k": 0}, "k .* must be an int >= 1, got 0"),
        ("shuffled", {"k": 2}, "k applies to sampler 'k-labels' only"),
        ("online", {"batch_size": 4}, "needs batch_size 1, got 4"),
        ("shuffled", {"scale": (0.0, 1.0)}, r"0 < lo <= hi .*got \(0.0, 1.0\)"),
        ("shuffled", {"scale": (-1.0, 1.0)}, "0 < lo <= hi"),
        ("shuffled", {"scale": (2.0, 1.0)}, r"0 < lo <= hi .*got \(2.0, 1.0\)"),
        ("shuffled", {"scale": 3.0}, "tuple"),
        ("scaled", {"scale_dist": "normal"}, "scale_dist must be one of"),
        ("shuffled", {"sampler": "random"}, "sampler must be one of"),
        ("shuffled", {"batchsize": 3}, "unknown Scenario field.*batch_size"),
    ],
)
def test_scenario_errors(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_scenario(name, **overrides)


@pytest.mark.parametrize("name", ["shuffled", "unshuffled", "k-labels", "online", "small-batch"])
def test_scenario_make_sampler(name):
    y = imbalanced_labels()
    scenario = get_scenario(name)
    sampler = scenario.make_sampler(y, seed=3)
    assert sampler.kind == scenario.sampler and sampler.batch_size == scenario.batch_size
    assert sampler.seed == 3
    assert torch.equal(torch.cat(sampler.batches()).sort().values, torch.arange(len(y)))


def _toy_dataset(n_train=300, n_test=100, regression=False) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.rand(n_train, 2, 3, generator=g), torch.rand(n_test, 2, 3, generator=g)
    if regression:
        y_train, y_test = torch.randn(n_train, generator=g), torch.randn(n_test, generator=g)
        return Dataset("toy", x_train, y_train, x_test, y_test, 0, "regression")
    y_train = torch.randint(0, 3, (n_train,), generator=g)
    y_test = torch.randint(0, 3, (n_test,), generator=g)
    return Dataset("toy", x_train, y_train, x_test, y_test, 3, "classification")


def test_apply_without_scale_returns_same_object():
    ds = _toy_dataset()
    assert get_scenario("shuffled").apply(ds, seed=0) is ds


@pytest.mark.parametrize("dist", ["uniform", "log-uniform"])
def test_scaling_fixed_per_sample_and_in_range(dist):
    ds = _toy_dataset()
    scenario = get_scenario("scaled", scale=(0.1, 10.0), scale_dist=dist)
    out = scenario.apply(ds, seed=4)
    again = scenario.apply(ds, seed=4)
    for split in ("train", "test"):
        x, x_scaled = getattr(ds, f"x_{split}"), getattr(out, f"x_{split}")
        factors = out.info[f"scale_factors_{split}"]
        assert factors.shape == (x.shape[0],)
        assert float(factors.min()) >= 0.1 and float(factors.max()) <= 10.0
        # every feature of sample i is multiplied by the same factor a_i
        ratio = x_scaled / x
        torch.testing.assert_close(ratio, factors[:, None, None].expand_as(x), rtol=1e-5, atol=0)
        # drawn once per sample: the same seed gives the same factors
        assert torch.equal(getattr(again, f"x_{split}"), x_scaled)
        assert torch.equal(getattr(out, f"y_{split}"), getattr(ds, f"y_{split}"))
    assert not torch.equal(out.info["scale_factors_train"][:100], out.info["scale_factors_test"])
    other = scenario.apply(ds, seed=5)
    assert not torch.equal(other.x_train, out.x_train)
    assert out.x_train is not ds.x_train and torch.equal(ds.x_train, _toy_dataset().x_train)


def test_scale_factor_distributions():
    n = 40_000
    uni = random_scale_factors(n, (0.1, 10.0), seed=0).double()
    log = random_scale_factors(n, (0.1, 10.0), seed=0, scale_dist="log-uniform").double()
    # U[lo, hi]: mean (lo+hi)/2, std (hi-lo)/sqrt(12); log-uniform: log a ~ U[log lo, log hi]
    se = (9.9 / math.sqrt(12)) / math.sqrt(n)
    assert abs(float(uni.mean()) - 5.05) < 5 * se
    assert abs(float(uni.std()) - 9.9 / math.sqrt(12)) < 0.05
    assert abs(float(log.log().mean())) < 5 * (2 * math.log(10) / math.sqrt(12)) / math.sqrt(n)
    assert abs(float((log < 1.0).double().mean()) - 0.5) < 0.02  # median at sqrt(lo*hi) = 1
    assert abs(float((uni < 1.0).double().mean()) - 0.9 / 9.9) < 0.01
    # a pure function of (seed, stream): fixed per sample index, prefixes agree
    assert torch.equal(random_scale_factors(100, (0.1, 10.0), seed=0), uni[:100].float())
    assert not torch.equal(
        random_scale_factors(100, (0.1, 10.0), seed=0, stream=1), uni[:100].float()
    )
    const = random_scale_factors(5, (2.0, 2.0), seed=0)
    assert torch.equal(const, torch.full((5,), 2.0))


def test_scale_samples_shapes():
    x = torch.ones(4, 3)
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(scale_samples(x, f), f[:, None].expand(4, 3))
    with pytest.raises(ValueError, match="one factor per sample"):
        scale_samples(x, torch.ones(3))


def test_regression_dataset_with_scenarios():
    ds = _toy_dataset(regression=True)
    for name in ("shuffled", "online", "scaled"):
        scenario = get_scenario(name)
        out = scenario.apply(ds, seed=0)
        sampler = scenario.make_sampler(out.y_train, seed=0)
        assert torch.equal(torch.cat(sampler.batches()).sort().values, torch.arange(ds.num_train))
    for name in ("unshuffled", "k-labels"):
        with pytest.raises(ValueError, match="regression"):
            get_scenario(name).make_sampler(ds.y_train, seed=0)
