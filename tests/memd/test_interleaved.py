"""Experts stored with their rows in interleaved pairs (transformers' ``Interleave`` conversion, Inkling2's fused
gate and up projection: gate 0, up 0, gate 1, ...): memd indexes them as such and every path that fills a slot
(the reader, buffered and O_DIRECT, rows packed or spread apart; the slot images; the lossy formats' source) puts
the rows in the parameter's order, bit for bit what transformers loads."""
import numpy as np
import pytest
import torch
from helpers import write_family

from common.checkpoint import Checkpoint, CheckpointError, KeyMapper
from services.memd.slot_images import LosslessImages
from services.memd.spread import place_rows, spread_rows
from services.memd.store import ExpertStore
from services.worker.pool_views import slot_params
from test_spread import read_all


@pytest.fixture(scope="module")
def inkling(tmp_path_factory):
    """Inkling2 with 2 KiB rows in its experts' gate_up_proj (hidden 1024, bfloat16: spread apart on the CPU)."""
    return write_family("inkling2_text", tmp_path_factory.mktemp("ink") / "m", dtype="bfloat16", hidden_size=1024)


@pytest.fixture(scope="module")
def loaded(inkling):
    """What transformers makes of each MoE layer's experts: ``{module: {param: [experts, ...] tensor}}``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inkling, dtype=torch.bfloat16)
    index = ExpertStore(Checkpoint(inkling)).index()
    return {name: {spec.name: getattr(model.get_submodule(name), spec.name).detach().clone()
                   for spec in index.tensors} for name in index.modules}


def test_the_fused_projection_is_indexed_as_interleaved_rows(inkling):
    index = ExpertStore(Checkpoint(inkling)).index()
    specs = {s.name: s for s in index.tensors}
    rows = specs["gate_up_proj"].shape[-1] * 2
    for segments in index.experts:
        kinds = {(s.slot_offset, s.interleaved, s.row_bytes) for s in segments}
        assert kinds == {(specs["gate_up_proj"].offset, True, rows), (specs["down_proj"].offset, False, 0)}


@pytest.mark.parametrize("spread", [False, True], ids=["packed", "spread"])
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_the_reader_puts_the_rows_in_the_parameters_order(inkling, loaded, spread, direct_io):
    index = ExpertStore(Checkpoint(inkling)).index()
    index = spread_rows(index) if spread else index
    assert any(s.row_stride for s in index.tensors) == spread
    pool, slots = read_all(index, direct_io)
    params = slot_params(pool, index.tensors)
    for layer, module in enumerate(index.modules):
        for e in range(index.num_experts):
            for name, want in loaded[module].items():
                assert torch.equal(params[name][slots[(layer, e)]], want[e]), (module, e, name)


def test_slot_images_and_the_lossy_formats_source_hold_the_parameters_order(inkling, loaded, tmp_path):
    images = LosslessImages.of(inkling, tmp_path / "spread")  # rows spread apart, as memd serves a CPU worker
    packed = LosslessImages(ExpertStore(Checkpoint(inkling)).index(), inkling, tmp_path / "packed")
    for key in [(0, 0), (1, 5)]:
        module = images.modules[key[0]]
        as_bytes = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, -1)  # noqa: E731
        views = [slot_params(as_bytes(images.convert(key)), images.served.tensors),
                 slot_params(as_bytes(images._read_source(key)), images.source.tensors),
                 slot_params(as_bytes(packed._read_source(key)), packed.source.tensors)]  # what fp8 / mxfp4 encode
        for view in views:
            for name, want in loaded[module].items():
                assert torch.equal(view[name][0], want[key[1]]), (key, name)


@pytest.mark.parametrize("stride", [96, 160], ids=["packed", "spread"])
@pytest.mark.parametrize("start,length", [(0, 8 * 96), (5, 96), (40, 7), (95, 200), (96, 96 * 3 + 1), (190, 500)])
def test_place_rows_reorders_any_piece_of_interleaved_rows(start, length, stride):
    """A piece that starts and ends anywhere in a row: stored row 2 i + s lands in row s * rows / 2 + i."""
    rows, row_bytes, base = 8, 96, 320
    stored = np.random.default_rng(1).integers(0, 256, rows * row_bytes, dtype=np.uint8)
    pool = np.zeros(base + rows * stride, dtype=np.uint8)
    place_rows(pool, memoryview(stored[start:start + length]), base + start, (base, row_bytes, stride, rows // 2))
    want = np.zeros_like(pool)
    for i in range(start, min(start + length, rows * row_bytes)):
        row, col = divmod(i, row_bytes)
        want[base + ((row % 2) * (rows // 2) + row // 2) * stride + col] = stored[i]
    assert np.array_equal(pool, want)


def add_w13_scales(model) -> None:
    """Give ``model``'s first stacked ``w13_weight`` a quantization scale companion (``w13_weight_scale``)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    w13 = next(k for k in tensors if k.endswith("mlp.experts.w13_weight"))
    tensors[w13 + "_scale"] = torch.ones(*tensors[w13].shape[:2], tensors[w13].shape[2] // 32, dtype=torch.uint8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def convert_w13_with(monkeypatch, converter_for) -> None:
    """Map the checkpoint's ``w13_weight`` through ``converter_for(converter, pattern)`` instead of its own."""
    real = KeyMapper.map

    def mapped(self, key):
        target, converter, pattern = real(self, key)
        if converter is not None and key.endswith("w13_weight"):
            converter = converter_for(converter, pattern)
        return target, converter, pattern
    monkeypatch.setattr(KeyMapper, "map", mapped)


def test_inkling2_loop_experts_are_read_as_stored_and_refused_quantized(tmp_path):
    """Inkling2-Loop's converter dequantizes NVFP4 / MXFP8 experts at load, and passes a lone bf16 tensor through:
    memd reads such a checkpoint as stored (its w13 interleaved), and refuses one with the scales, naming them."""
    model = write_family("inkling2_loop_text", tmp_path / "m", dtype="bfloat16")
    index = ExpertStore(Checkpoint(model)).index()
    assert {s.interleaved for segs in index.experts for s in segs} == {True, False}
    add_w13_scales(model)
    with pytest.raises(CheckpointError, match=r"w13_weight_scale: experts stored in a quantized format that"
                                              r" transformers converts with Inkling2LoopDequantizeExperts"):
        ExpertStore(Checkpoint(model))


def test_an_interleave_memd_cannot_read_is_refused_with_its_reason(inkling, monkeypatch):
    from transformers.core_model_loading import Interleave

    for op, reason in [(Interleave(dim=2), "another dimension than the rows"),
                       (Interleave(dim=1, inverse=True), "the inverse order")]:
        convert_w13_with(monkeypatch, lambda c, pattern, op=op: type(c)(c.source_patterns, c.target_patterns,
                                                                          operations=[op]))
        with pytest.raises(CheckpointError, match=rf"w13_weight: conversion Interleave\(.*\) is not supported here"
                                                  rf" \({reason}\)"):
            ExpertStore(Checkpoint(inkling))


def test_inkling2_scales_without_a_quantization_config_are_refused_by_name(tmp_path):
    model = write_family("inkling2_text", tmp_path / "m", dtype="bfloat16")
    add_w13_scales(model)
    with pytest.raises(CheckpointError, match=r"w13_weight_scale: maps to .*gate_up_proj_scale_inv, a quantization"
                                              r" scale the experts module has no parameter for"):
        ExpertStore(Checkpoint(model))


def test_another_conversion_of_stacked_experts_is_refused_by_name(inkling, monkeypatch):
    """Two stacked tensors concatenated (no expert number in the patterns): refused by the conversion's name, not as
    a quantized format and not with an IndexError from the expert-number parse."""
    from transformers.core_model_loading import Concatenate

    convert_w13_with(monkeypatch, lambda c, pattern: type(c)([pattern, pattern + "_b"], c.target_patterns,
                                                             operations=[Concatenate(dim=1)]))
    with pytest.raises(CheckpointError, match=r"w13_weight: conversion \['Concatenate'\] of stacked experts is not"
                                              r" supported"):
        ExpertStore(Checkpoint(inkling))
