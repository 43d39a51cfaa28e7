"""The sampler with patch policies: per-sample sizes, grouping, traces, FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DIT

from ddit.adapter import MultiPatchTransformer
from ddit.flops import count_flops
from ddit.policies import FixedPolicy, OraclePolicy, PatchPolicy, get_policy
from ddit.sampling import sample, transformer_velocity
from ddit.testbed.base_model import NULL_LABEL, build_base_model, generate

SHAPE = (3, 32, 32)
LABELS = torch.tensor([0, 1, 2, 3])
RUN = dict(sample_shape=SHAPE, steps=4, guidance=2.0, null_label=NULL_LABEL, seed=7)


class Alternate(PatchPolicy):
    """Samples 0, 2 at size 4 and 1, 3 at the base size, at every step."""

    name = "alternate"

    def choose(self, step):
        return torch.tensor([4, 2, 4, 2])[: self.batch_size], {}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    base = build_base_model(**TINY_DIT)
    for p in base.parameters():  # non-zero output, unlike the adaLN-zero init
        torch.nn.init.normal_(p, std=0.05)
    return MultiPatchTransformer(base.eval())


def test_groups_run_like_separate_runs_at_their_sizes(model):
    fn = transformer_velocity(model)
    mixed = sample(fn, LABELS, policy=Alternate(), **RUN)
    for i, size in enumerate([4, 2, 4, 2]):
        alone = sample(fn, LABELS[i : i + 1], policy=FixedPolicy([size] * 4), **{**RUN, "seed": 7 + i})
        assert torch.allclose(mixed.images[i], alone.images[0], atol=1e-5)
        assert [r["patch_size"] for r in mixed.traces[i]] == [size] * 4


def test_fixed_policy_at_the_base_size_reproduces_plain_sampling(model):
    plain = generate(model, LABELS, steps=4, seed=3)
    fixed = generate(model, LABELS, steps=4, seed=3, policy=FixedPolicy([2] * 4))
    assert torch.equal(plain.images, fixed.images)
    assert plain.traces[0][0]["patch_size"] == 2


def test_traces_show_the_chosen_sizes_and_cheaper_coarse_steps(model):
    out = generate(model, LABELS[:2], steps=4, policy=FixedPolicy([8, 4, 2, 2]))
    trace = out.traces[1]
    assert [r["patch_size"] for r in trace] == [8, 4, 2, 2]
    assert [r["tokens"] for r in trace] == [2 * 16, 2 * 64, 2 * 256, 2 * 256]
    assert trace[2]["flops"] == trace[3]["flops"]
    assert trace[1]["flops"] < trace[2]["flops"] / 3 and trace[0]["flops"] < trace[1]["flops"] / 2
    assert all(r["seconds"] > 0 and not r["cached"] for r in trace)


def test_a_samples_flops_are_counted_for_it_alone(model):
    """A batch costs the sum of its samples: the count is the same in a group of 4 or of 1."""
    fn = transformer_velocity(model)
    together = sample(fn, LABELS, **RUN)
    with torch.no_grad():  # one sample's step, counted here without the sampler's cache of counts
        one = count_flops(fn, torch.zeros(1, 3, 32, 32), torch.full((1,), 500.0), LABELS[:1],
                          together.traces[0][0]["patch_size"])
    branches = 2 if RUN.get("guidance", 1.0) != 1.0 else 1
    assert together.traces[0][0]["flops"] == branches * one
    with torch.no_grad():
        batch = count_flops(fn, torch.zeros(4, 3, 32, 32), torch.full((4,), 500.0), LABELS, 2)
    assert batch == 4 * count_flops(fn, torch.zeros(1, 3, 32, 32), torch.full((1,), 500.0), LABELS[:1], 2)


def test_policy_signals_reach_the_trace(model):
    out = generate(model, LABELS[:2], steps=5, policy=get_policy("first_order", tau=1e9))
    assert out.traces[0][0]["signals"] == {}
    later = out.traces[1][-1]
    assert set(later["signals"]) == {2, 4, 8} and later["patch_size"] == 8


def test_oracle_probes_the_model_at_every_candidate(model):
    out = generate(model, LABELS[:2], steps=2, policy=OraclePolicy(tolerance=1e9))
    assert [r["patch_size"] for r in out.traces[0]] == [8, 8]
    assert out.traces[0][0]["signals"][2] == 0 < out.traces[0][0]["signals"][4]


def test_cpu_attention_is_counted():
    q = torch.randn(2, 3, 16, 8)  # batch, heads, tokens, head dim
    assert count_flops(F.scaled_dot_product_attention, q, q, q) == 2 * (2 * 2 * 3 * 16 * 16 * 8)


def test_the_sampler_runs_a_model_in_its_own_dtype():
    torch.manual_seed(0)
    base = build_base_model(**TINY_DIT)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = MultiPatchTransformer(base.eval()).to(torch.float64)
    out = sample(transformer_velocity(model), LABELS[:2], policy=FixedPolicy([4, 4, 2, 2]), **RUN)
    reference = sample(transformer_velocity(model.to(torch.float32)), LABELS[:2], policy=FixedPolicy([4, 4, 2, 2]),
                       **RUN)
    assert out.images.dtype == torch.float32 and torch.allclose(out.images, reference.images, atol=1e-4)
