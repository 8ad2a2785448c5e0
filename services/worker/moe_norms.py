"""The gain of the RMSNorm in front of each MoE block, so that a guess of layer l+d's experts made from layer l's
input sees what layer l+d's router will see (``speculate.py``).

A MoE block's input is ``x_l = h / rms(h) * g_l``: the residual stream normalised, times layer l's own per-channel
gain. Layer l+d's router is trained on ``h' / rms(h') * g_{l+d}``. Guessing it from ``x_l`` as it is multiplies
every channel by the wrong gain; ``x_l / g_l * g_{l+d}`` is the same residual stream under the right one (exact
when ``h' = h``, the approximation hidden-state speculation rests on). Real checkpoints' gains differ from layer to
layer by large factors; random-weight test models have gains of 1, where the two guesses are the same.

Found generically: the decoder layer's child named as the pre-MLP norm in transformers' families, checked by
behaviour (it must act as ``x / rms(x) * w`` or Gemma's ``x / rms(x) * (1 + w)`` on probe vectors with a non-zero
mean, which a LayerNorm fails); anything else leaves speculation as it was. A name can mislead (post-norm layers
such as FlexOlmo's put ``post_attention_layernorm`` on the attention's output and feed the block the raw stream),
so the speculator also checks, on each layer's first real input, that the input over the gain found has rms 1
per token, and drops the correction for every layer if not (``premise_holds``).
"""
from __future__ import annotations

import torch
from torch import nn

# the norm feeding the MLP / MoE block, by the names transformers' families give it (where a layer has a
# post_attention_layernorm on the attention's output instead, the name misleads: Speculator checks the premise on the
# real inputs and drops the correction, see ``premise_holds``)
NAMES = ("pre_feedforward_layernorm", "pre_ff_layernorm", "pre_mlp_layernorm", "post_attention_layernorm", "ffn_norm")
RTOL = 2e-2  # per element: a bfloat16 output's rounding (2^-8), not another function
PREMISE = 0.05  # how far from 1 the rms of a block's input over its gain may be (``premise_holds``)


def moe_input_gains(model: nn.Module, blocks: list[str]) -> list[torch.Tensor] | None:
    """Per MoE block (``blocks``: the blocks' module paths, e.g. ``model.layers.3.mlp``), the float32 gain of the
    RMSNorm that feeds it; None unless every block has one without a zero channel (a guess mixing corrected and
    plain layers would be wrong both ways)."""
    hidden = model.config.get_text_config().hidden_size
    gains = [block_input_gain(model.get_submodule(path.rpartition(".")[0]), hidden) if "." in path else None
             for path in blocks]
    if not gains or any(g is None or bool((g == 0).any()) for g in gains):
        return None
    return gains


def block_input_gain(decoder_layer: nn.Module, hidden: int) -> torch.Tensor | None:
    for name in NAMES:
        norm = getattr(decoder_layer, name, None)
        if isinstance(norm, nn.Module):
            return rms_gain(norm, hidden)
    return None


@torch.no_grad()
def rms_gain(norm: nn.Module, hidden: int) -> torch.Tensor | None:
    """``w`` (or ``1 + w``) when ``norm`` computes ``x / rms(x) * w`` (or ``* (1 + w)``), float32 on the CPU."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta or tuple(weight.shape) != (hidden,):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(2, hidden, generator=gen) + 1.0).to(weight.dtype)  # mean 1: a LayerNorm subtracts it
    try:
        out = norm(probe.to(weight.device).unsqueeze(0)).squeeze(0).float().cpu()
    except Exception:  # not a plain norm: leave speculation as it is
        return None
    x = probe.float()
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    w = weight.detach().float().cpu()
    errors = []
    for gain in (w, 1.0 + w):
        want = unit * gain
        slack = RTOL * want.abs() + 1e-3 * want.abs().max().clamp_min(1e-12)  # (near-zero gains: their own scale)
        if bool(((out - want).abs() <= slack).all()):
            errors.append(((out - want).abs().max().item(), len(errors), gain))
    return min(errors)[2] if errors else None


def premise_holds(hidden: torch.Tensor, unscale: torch.Tensor) -> bool:
    """Whether ``hidden`` (a block's input, ``[tokens, hidden]``) over the block's gain is the residual stream
    normalised (rms 1 per token), as it is when the gain found is the norm that feeds the block."""
    rms = (hidden.float() * unscale).pow(2).mean(-1).sqrt()
    return bool(((rms - 1.0).abs() <= PREMISE).all())
