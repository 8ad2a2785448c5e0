"""The rotary embedding in one kernel call per tensor (``rotary.py``): bit for bit the families' own
``apply_rotary_pos_emb`` (checked on every tested family's modeling module that has one), a function that computes
something else (partial or interleaved rotation) left alone, the kernel used only inside a moeinf step (plain
transformers beside it runs its own code), and what the kernel does not take (float32, several sequences, another
``unsqueeze_dim``) handed to the module's own function. The end-to-end oracle (a worker's greedy tokens against
transformers' with the kernels on) is tests/worker/test_exactness.py."""
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, family_config
from services.worker import dequant_kernel as dk
from services.worker import matvec_checks, rotary

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def kernel(kernel_cache):
    return rotary.RotaryKernel(dk.load("c", kernel_cache, 1, check=matvec_checks.check))


def own_function(family: str):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_config(family))
    return getattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb", None)


def test_the_kernel_gives_the_families_own_bits_or_is_not_used(kernel):
    """Every family whose function rotates whole heads in halves gets the kernel; the others keep theirs (the probe
    says which, never a list of families)."""
    taken = []
    for family in FAMILIES:
        fn = own_function(family)
        if fn is not None and rotary.same_bits(fn, kernel, 64):
            taken.append(family)
    assert "mixtral" in taken and "qwen2_moe" in taken

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # pairs (0, 1), (2, 3), ...: another rotation
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def in_float32(q, k, cos, sin, unsqueeze_dim=1):
        mixtral = own_function("mixtral")
        out = mixtral(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim)
        return tuple(t.to(q.dtype) for t in out)

    assert not rotary.same_bits(interleaved, kernel, 64) and not rotary.same_bits(in_float32, kernel, 64)


def test_only_a_moeinf_step_uses_the_kernel_and_what_it_does_not_take_goes_to_the_own_function(kernel):
    calls = []

    def own(q, k=None, cos=None, sin=None, unsqueeze_dim=1):  # (queries alone: Qwen4-Exp's signature)
        calls.append(q.dtype)
        return q, k

    rotate = lambda *a, **kw: rotary._rotate(own, kernel, *a, **kw)  # noqa: E731
    q = torch.randn(1, 3, 4, 64).bfloat16().transpose(1, 2)
    k = torch.randn(1, 3, 2, 64).bfloat16().transpose(1, 2)
    angles = torch.rand(1, 3, 64)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    rotate(q, k, cos, sin)
    assert len(calls) == 1  # outside a step: the module's own
    with rotary.active():
        q_out, k_out = rotate(q, k, cos, sin)
        assert len(calls) == 1 and q_out.stride() == q.stride() and not torch.equal(q_out, q)
        rotate(q.float(), k.float(), cos.float(), sin.float())
        rotate(q, k, cos, sin, unsqueeze_dim=2)
        rotate(torch.cat([q, q]), torch.cat([k, k]), torch.cat([cos, cos]), torch.cat([sin, sin]))
        rotate(q, cos=cos, sin=sin, unsqueeze_dim=1)  # queries alone, by keyword
        rotate(q, k, cos=cos, sin=sin)
        rotate(q, None, cos, sin)
    assert len(calls) == 7
