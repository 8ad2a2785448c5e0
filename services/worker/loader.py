"""Loading a checkpoint into the worker: dense weights resident, expert weights never materialised.

The model is built with every parameter on the meta device (buffers such as rotary frequencies stay real),
then each non-expert tensor of the checkpoint is read and set in place, with names mapped by transformers'
own conversion mapping (and converted by it where the model fuses or splits them). Expert parameters stay on
meta: the worker computes on views into memd's pool.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging

import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig
from transformers.core_model_loading import dot_natural_key

from common.checkpoint import (Checkpoint, CheckpointError, KeyMapper, find_moe_layers, in_experts, model_class,
                               split_part)
from services.worker import layouts

log = logging.getLogger("moeinf.worker.loader")


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside lands on the meta device (no memory); buffers are computed for real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config, experts_implementation: str):
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with parameters_on_meta():
        try:
            model = model_class(config).from_config(copy.deepcopy(config), dtype=dtype,
                                                    experts_implementation=experts_implementation)
        except ValueError as exc:  # no ExpertsInterface (experts kept one module per expert: bound by experts.bind)
            if "experts_implementation" not in str(exc) or not getattr(config, "is_encoder_decoder", False):
                raise
            model = model_class(config).from_config(config, dtype=dtype)
    return model.eval()


def load_dense(model, checkpoint: Checkpoint, expert_modules: set[str], keyed: frozenset | set = frozenset(),
               spread_skip: set[int] | None = None) -> int:
    """Set every non-expert tensor from the checkpoint; returns the bytes loaded. Block-FP8 weights (with a
    ``weight_scale_inv``) are dequantized to the parameter's dtype as ``from_pretrained`` does with
    ``dequantize=True``, in the config's blocks (``_dequantize_fp8``); an fp8 tensor without scales is refused.
    With ``spread_skip`` (the widths to leave: the routers'), a bfloat16 linear's weight whose rows are a multiple
    of 2 KiB long is copied from the checkpoint straight into rows spread apart (``layouts.spread_rows``, for the
    CPU kernels): one copy, as the others get."""
    fmt, block = checkpoint.quant_format()  # refuses an unsupported quantization by name
    mapper = KeyMapper(model)
    by_file: dict[str, list[tuple[str, str]]] = {}
    converted: dict[str, tuple[object, list]] = {}  # target -> (converter, its source tensors)
    for key, entry in sorted(checkpoint.tensors.items(), key=lambda item: dot_natural_key(item[0])):
        base, part = split_part(key, fmt)
        target, converter, pattern = mapper.map(base)
        if in_experts(target, expert_modules, keyed) or part != "values" or key.endswith(".activation_scale"):
            continue  # experts come from memd; scales are read with their weight; activation scales are dynamic
        if converter is not None:
            converted.setdefault(target, (converter, []))[1].append((key, pattern, entry))
            continue
        by_file.setdefault(entry.file, []).append((key, target))
    loaded = sum(_convert(model, checkpoint, target, *found) for target, found in converted.items())
    for path, pairs in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for key, target in pairs:
                tensor = _own(model, target, f.get_tensor(key), spread_skip)
                scale = checkpoint.tensors.get(f"{key}_scale_inv")
                if scale is not None:
                    scales = _read(checkpoint, f"{key}_scale_inv", scale)
                    tensor = _dequantize_fp8(model, target, tensor, scales, block, key)
                elif tensor.element_size() == 1 and tensor.dtype.is_floating_point:
                    raise CheckpointError(f"{key}: an fp8 tensor without its {key}_scale_inv (no block scales in"
                                          " the listed shards): its values alone are not the weight")
                loaded += _set_tensor(model, target, tensor, key)
    return loaded


def _own(model, target: str, tensor: torch.Tensor, spread_skip: set[int] | None) -> torch.Tensor:
    """A copy of a checkpoint tensor (own the memory: no mmap page of the checkpoint stays mapped), its rows spread
    apart where ``load_dense`` says."""
    if spread_skip is not None and tensor.dtype == torch.bfloat16 and layouts.spreads(tensor) \
            and target.endswith(".weight"):
        if layouts.kernel_linear(model.get_submodule(target.rpartition(".")[0]), spread_skip):
            return layouts.spread_rows(tensor)
    return tensor.clone()


def _convert(model, checkpoint: Checkpoint, target: str, converter, sources: list) -> int:
    """Set the tensors transformers' ``converter`` makes of ``sources`` (e.g. q/k/v kernels concatenated into
    one), as ``from_pretrained`` does: a copy of the converter per target, its source tensors in key order."""
    converter = copy.deepcopy(converter)
    for key, pattern, entry in sources:
        if f"{key}_scale_inv" in checkpoint.tensors:
            raise CheckpointError(f"{key}: quantized dense weights that need conversion ({target}) are not supported")
        converter.add_tensor(target, key, pattern, functools.partial(_read, checkpoint, key, entry))
    made = converter.convert(target, model=model, config=model.config)
    return sum(_set_tensor(model, name, tensor[0] if isinstance(tensor, list) else tensor, target)
               for name, tensor in made.items())


def _read(checkpoint: Checkpoint, key: str, entry) -> torch.Tensor:
    with safe_open(entry.file, framework="pt", device="cpu") as f:
        return f.get_tensor(key).clone()


def _dequantize_fp8(model, target: str, weight: torch.Tensor, scales: torch.Tensor, block, key: str) -> torch.Tensor:
    """``weight`` (float8) times its block's scale, in float32, then the parameter's dtype: what transformers'
    ``Fp8Dequantize`` computes, but in ``quantization_config.weight_block_size`` blocks (transformers derives the
    block from the scale grid, which a weight whose rows are not a multiple of the block (DeepSeek's 576-row
    ``kv_a_proj_with_mqa``) ships rounded up: a refusal, or wrong blocks where the rounded grid divides it)."""
    module_name, _, name = target.rpartition(".")
    param = getattr(model.get_submodule(module_name), name, None)
    dtype = param.dtype if isinstance(param, torch.Tensor) else torch.bfloat16
    if weight.dim() != 2 or scales.dim() != 2:
        raise CheckpointError(f"{key}: a {weight.dim()}-D fp8 weight with {scales.dim()}-D scales; dense fp8 weights"
                              " are taken as [out, in] matrices with one scale per block")
    rows, cols = weight.shape
    block_r, block_c = block if block else (-(-rows // scales.shape[-2]), -(-cols // scales.shape[-1]))
    grid = (-(-rows // block_r), -(-cols // block_c))
    if tuple(scales.shape) != grid or not scales.dtype.is_floating_point:
        raise CheckpointError(f"{key}_scale_inv: {list(scales.shape)} {scales.dtype} scales for a {rows} x {cols}"
                              f" weight in {block_r} x {block_c} blocks (float scales of shape {list(grid)} expected)")
    stretched = scales.float().repeat_interleave(block_r, 0)[:rows].repeat_interleave(block_c, 1)[:, :cols]
    return (weight.to(torch.float32) * stretched).to(dtype)


def _set_tensor(model, target: str, tensor: torch.Tensor, key: str) -> int:
    module_name, _, name = target.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        log.debug("checkpoint tensor %s (-> %s) has no place in the model; ignored", key, target)
        return 0
    if name in module._parameters:
        old = module._parameters[name]
        if tuple(old.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{key}: shape {list(tensor.shape)} != model's {list(old.shape)} for {target}")
        # requires_grad stays True, as in from_pretrained: inference_mode makes it free, and torch 2.13's CPU
        # F.linear takes a ~40x slower path for a non-contiguous input when the weight does not require grad
        # (seen on the LM head with hidden[:, -1:] during prefill).
        module._parameters[name] = nn.Parameter(tensor.to(old.dtype))
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        log.debug("checkpoint tensor %s (-> %s) is not a parameter or buffer; ignored", key, target)
        return 0
    return tensor.numel() * tensor.element_size()


def check_materialised(model, expert_modules: set[str], keyed: frozenset | set = frozenset()) -> None:
    model.tie_weights()
    missing = [n for n, p in model.named_parameters()
               if p.device.type == "meta" and not in_experts(n, expert_modules, keyed)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint lacks weights the model needs: {shown}")


def load_model(checkpoint: Checkpoint, experts_implementation: str, spread: bool = False):
    """Return ``(model, moe_layers)`` with dense weights loaded and experts left on meta; ``spread``: the linears'
    rows spread apart where the CPU kernels read them faster (not the routers', which keep ``F.linear``)."""
    config = checkpoint.load_config()
    model = build_skeleton(config, experts_implementation)
    layers = find_moe_layers(model)
    expert_modules = {layer.module for layer in layers}
    keyed = {layer.module for layer in layers if layer.keyed}
    nbytes = load_dense(model, checkpoint, expert_modules, keyed, layouts.router_widths(layers) if spread else None)
    check_materialised(model, expert_modules, keyed)
    try:  # generate's settings (an encoder-decoder model's decoder_start_token_id) as the checkpoint ships them
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.dir)
    except OSError:  # no generation_config.json: the model config's defaults
        pass
    log.info("loaded %s: %.1f MiB of dense weights, %d MoE layers offloaded", type(model).__name__,
             nbytes / 2**20, len(layers))
    return model, layers
