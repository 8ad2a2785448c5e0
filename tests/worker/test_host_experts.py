"""The worker's side of memd's ``--cpu-experts on`` (services/worker/host_experts.py), on the CPU: a layer whose
experts are split between the pool (computed as always, the CPU's entries at weight 0) and the host tier (each
computed alone for its tokens, added to the output) gives transformers' own experts output; the token counts memd
weighs the cost by; the cost measurement; leases never keep a host-tier slot."""
from types import SimpleNamespace

import pytest
import torch
from transformers import MixtralConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from services.worker.experts import ExpertBinding, Routing
from services.worker.host_experts import HostExperts

E, K, H = 4, 2, 16


def experts_module(dtype) -> MixtralExperts:
    config = MixtralConfig(hidden_size=H, intermediate_size=32, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "grouped_mm"
    module = MixtralExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module.to(dtype)


def pool(module, placement: dict[int, int], num_slots: int) -> dict[str, torch.Tensor]:
    """``[num_slots, ...]`` tensors holding expert e at slot ``placement[e]`` (the rest zeros)."""
    params = {}
    for name, p in module.named_parameters():
        t = torch.zeros(num_slots, *p.shape[1:], dtype=p.dtype)
        for e, slot in placement.items():
            t[slot] = p[e]
        params[name] = t
    return params


def views_of(params: dict[str, torch.Tensor], num_slots: int) -> SimpleNamespace:
    """What ExpertBinding and HostExperts use of PoolViews."""
    return SimpleNamespace(params=params, num_slots=num_slots, quantized=set(), contiguous=False,
                           window=lambda lo, hi: {n: t[lo:hi] for n, t in params.items()},
                           crosses=lambda lo, hi: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 40])  # a decode-sized step (routing read into lists) and a larger one
@pytest.mark.parametrize("on_host", [(2, 3), (0, 1, 2, 3)])  # some experts, or all, computed from the host tier
def test_a_layer_split_between_pool_and_host_tier_gives_transformers_output(dtype, tokens, on_host):
    module = experts_module(dtype)
    device = {e: s for s, e in enumerate(e for e in range(E) if e not in on_host)}  # pool slots 0..
    host = {e: 3 - i for i, e in enumerate(on_host)}  # host-tier slots, in another order
    binding = ExpertBinding(0, module, views_of(pool(module, device, E), E), client=None, steps=None)
    tier = HostExperts(views_of(pool(module, host, E), E))
    torch.manual_seed(tokens)
    hidden = torch.randn(tokens, H, dtype=dtype)
    top_k_index = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
    top_k_weights = torch.softmax(torch.randn(tokens, K), dim=-1).to(dtype)
    expect = grouped_mm_experts_forward(module, hidden, top_k_index, top_k_weights)
    routing = (Routing.small(top_k_index.tolist(), top_k_weights.float().tolist(), [], []) if tokens <= 16 else
               Routing(torch.unique(top_k_index).tolist(), [], [], [], None))
    slots = [host.get(e, device.get(e)) for e in routing.experts]
    positions = [j for j, e in enumerate(routing.experts) if e in host]
    got = tier.forward(binding, routing, slots, positions, hidden, top_k_index, top_k_weights)
    # top-2: a pool part (the CPU's entry at weight 0 adds exactly 0) plus a CPU part is the same two-term sum, up to
    # rounding (one expert's rows multiplied apart; on a GPU, another matmul kernel: docs/gpu.md)
    torch.testing.assert_close(got, expect, rtol=2**-8 if dtype == torch.bfloat16 else 2e-6, atol=1e-6)


def test_token_counts_per_expert_from_lists_or_tensors():
    index = [[0, 2], [2, 3], [2, 0]]
    assert HostExperts.counts([0, 2, 3], index, None, E) == [2, 3, 1]
    assert HostExperts.counts([0, 2, 3], None, torch.tensor(index), E) == [2, 3, 1]


def test_the_cost_measurement_gives_a_fixed_part_and_a_part_per_token():
    module = experts_module(torch.bfloat16)
    tier = HostExperts(views_of(pool(module, {0: 0}, 1), 1))
    fixed, per_token = tier.measure(module, H, torch.bfloat16, torch.device("cpu"))
    assert 0 < fixed + per_token < 1.0  # one token costs something, not seconds (a busy CPU can flatten the slope)


def test_the_cost_measurement_splits_a_fixed_part_from_a_part_per_token(monkeypatch):
    """On a clock the expert itself advances (2 ms + 0.25 ms a token; the cold first touch of each slot 50 ms,
    and one outlier per count, which the median drops), the fit gives back exactly those two parts."""
    from types import SimpleNamespace
    from services.worker import host_experts

    module = experts_module(torch.bfloat16)
    tier = HostExperts(views_of(pool(module, {0: 0}, 1), 1))
    clock, calls = [0.0], []

    def expert(module, slot, x, weights):
        calls.append(x.shape[0])
        first, outlier = len(calls) <= 1, len(calls) in (3, 12)
        clock[0] += 0.050 if first else 0.002 + 0.00025 * x.shape[0] + (0.5 if outlier else 0.0)
        return x

    monkeypatch.setattr(tier, "expert", expert)
    monkeypatch.setattr(host_experts, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    fixed, per_token = tier.measure(module, H, torch.bfloat16, torch.device("cpu"))
    assert abs(fixed - 0.002) < 1e-9 and abs(per_token - 0.00025) < 1e-9, (fixed, per_token)


def test_leases_never_keep_a_host_tier_slot(monkeypatch):
    from common import messages as m
    from services.worker.memd_client import MemdClient

    client = MemdClient.__new__(MemdClient)
    client.leases, client._seen_epoch = {}, 0
    client._update_leases(2, [5, 6, 7], m.AcquireReply([10, 3, 11], 1, host=[1], epoch=4))
    assert client.leases == {(2, 5): 10, (2, 7): 11} and client._seen_epoch == 4


def test_the_cpus_entries_never_touch_a_device_expert_even_one_that_overflows():
    """The CPU's (token, k) entries are sentinels on the device side, not a device expert at weight 0: a device
    expert whose output is inf (fp overflow) must not turn a token it was not routed to into NaN (inf x 0)."""
    module = experts_module(torch.float32)
    with torch.no_grad():
        module.down_proj[0].fill_(float("inf"))  # expert 0 overflows on any token
    device, host = {0: 0, 1: 1}, {2: 3, 3: 2}
    binding = ExpertBinding(0, module, views_of(pool(module, device, E), E), client=None, steps=None)
    tier = HostExperts(views_of(pool(module, host, E), E))
    hidden = torch.randn(2, H)
    top_k_index = torch.tensor([[2, 3], [0, 1]])  # token 0: only host experts; token 1: expert 0 (inf)
    top_k_weights = torch.full((2, K), 0.5)
    routing = Routing.small(top_k_index.tolist(), top_k_weights.tolist(), [], [])
    slots = [host.get(e, device.get(e)) for e in routing.experts]
    got = tier.forward(binding, routing, slots, [2, 3], hidden, top_k_index, top_k_weights)
    expect = grouped_mm_experts_forward(module, hidden, top_k_index, top_k_weights)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0], expect[0])


def test_returning_leases_also_lets_go_of_host_tier_slots():
    from services.worker.memd_client import MemdClient

    sent = []
    client = MemdClient.__new__(MemdClient)
    client.sock = SimpleNamespace(send=sent.append)
    client.leases, client.host = {}, []
    client.return_leases()
    assert sent == []  # nothing held: nothing to say
    client.host = [1]  # the last acquire had the CPU compute from a host-tier slot
    client.return_leases()
    assert len(sent) == 1 and client.host == []
