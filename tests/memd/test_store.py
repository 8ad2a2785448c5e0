"""ExpertStore + ExpertReader against transformers: every expert slot memd fills holds exactly the bytes of that
expert's parameters as ``from_pretrained`` loads them, for every family; broken checkpoints fail with
``CheckpointError`` naming the file or tensor."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, SHARDED, write_family
from safetensors.torch import load_file, save_file

import services.memd.reader as reader_mod
from common.checkpoint import Checkpoint, CheckpointError
from services.memd.reader import ExpertReader, _direct_io_works
from services.memd.store import ALIGN, ExpertStore

_MODELS: dict[Path, torch.nn.Module] = {}


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    if path not in _MODELS:
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path)
    return _MODELS[path]


def read_all(store: ExpertStore, layers, direct_io: bool) -> tuple[bytearray, dict, ExpertReader]:
    """Read every expert of ``layers`` into a local pool, one slot each; returns (pool, key -> slot, reader)."""
    keys = [(layer, e) for layer in layers for e in range(store.num_experts)]
    pool = bytearray(len(keys) * store.slot_bytes)
    reader = ExpertReader(store, memoryview(pool), store.slot_bytes, direct_io=direct_io)
    try:
        slots = {}
        for slot, key in enumerate(keys):
            nbytes, seconds = reader.read(key, slot)
            assert nbytes == store.expert_bytes and seconds > 0
            slots[key] = slot
    finally:
        reader.close()
    return pool, slots, reader


def assert_slots_match_transformers(store: ExpertStore, model, pool: bytearray, slots: dict) -> None:
    dtype = getattr(torch, store.dtype)
    for (layer, expert), slot in slots.items():
        module = model.get_submodule(store.layers[layer].module)
        for spec in store.tensors:
            want = getattr(module, spec.name)[expert]
            assert list(want.shape) == spec.shape and want.dtype == dtype
            count = want.numel()
            got = torch.frombuffer(pool, dtype=dtype, count=count, offset=slot * store.slot_bytes + spec.offset)
            assert torch.equal(got.view(spec.shape), want), f"layer {layer} expert {expert} {spec.name} differs"


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_slots_hold_transformers_expert_bytes(family, direct_io, checkpoints):
    store = ExpertStore(Checkpoint(checkpoints[family]))
    model = hf_model(checkpoints[family])
    assert store.model_type == model.config.model_type
    assert store.num_layers >= 2 and store.num_experts == 8
    assert [l.module for l in store.layers] == [n for n, mod in model.named_modules() if mod is not model and
                                                 hasattr(mod, "num_experts") and hasattr(mod, "is_transposed")]
    # slot layout: parameters in module order, 4 KiB aligned, the slot covers them all
    assert [s.name for s in store.tensors] == [n for n, _ in model.get_submodule(store.layers[0].module)
                                                .named_parameters(recurse=False)]
    assert all(s.offset % ALIGN == 0 for s in store.tensors) and store.slot_bytes % ALIGN == 0
    assert store.expert_bytes <= store.slot_bytes
    pool, slots, reader = read_all(store, [0, store.num_layers - 1], direct_io)
    # O_DIRECT where the file system has it (ext4, xfs), else a logged fallback to buffered reads
    assert reader.direct_io is (direct_io and _direct_io_works(store.checkpoint.files[0]))
    assert_slots_match_transformers(store, model, pool, slots)


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_small_read_chunks_and_unaligned_slots(direct_io, checkpoints, monkeypatch):
    """Reads split in many chunks (and, with O_DIRECT, staged through aligned buffers) give the same bytes."""
    monkeypatch.setattr(reader_mod, "CHUNK", 3 * ALIGN)
    family = "gpt_oss"  # stacked experts: every expert starts at an unaligned offset inside one tensor
    store = ExpertStore(Checkpoint(checkpoints[family]))
    assert any(seg.file_offset % ALIGN for segs in store.segments.values() for seg in segs)
    pool, slots, _ = read_all(store, range(store.num_layers), direct_io)
    assert_slots_match_transformers(store, hf_model(checkpoints[family]), pool, slots)


def test_bfloat16_checkpoint(tmp_path):
    path = write_family("mixtral", tmp_path / "bf16", dtype="bfloat16", num_hidden_layers=2)
    store = ExpertStore(Checkpoint(path))
    assert store.dtype == "bfloat16" and all(s.dtype == "bfloat16" for s in store.tensors)
    assert store.expert_bytes == 3 * 64 * 128 * 2
    pool, slots, _ = read_all(store, range(2), direct_io=True)
    assert_slots_match_transformers(store, hf_model(path), pool, slots)


def test_sharded_family_indexes_across_shards(checkpoints):
    path = checkpoints[SHARDED]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(path)
    assert len(ckpt.files) > 1 and {f.name for f in ckpt.files} == set(index["weight_map"].values())
    assert set(ckpt.tensors) == set(index["weight_map"])
    for key, entry in ckpt.tensors.items():
        assert Path(entry.file).name == index["weight_map"][key]
    store = ExpertStore(ckpt)
    files_per_expert = [{seg.file for seg in segs} for segs in store.segments.values()]
    assert any(len(files) > 1 for files in files_per_expert), "some expert should span two shards"
    assert {f for files in files_per_expert for f in files} <= {str(f) for f in ckpt.files}
    assert len(store.segments) == store.num_layers * store.num_experts


def test_total_expert_bytes(checkpoints):
    store = ExpertStore(Checkpoint(checkpoints["mixtral"]))
    # mixtral: w1, w3 (intermediate x hidden) and w2 (hidden x intermediate), float32
    assert store.expert_bytes == 3 * 128 * 64 * 4
    assert store.total_expert_bytes == store.expert_bytes * 4 * 8
    assert store.tensors[0].name == "gate_up_proj" and store.tensors[0].shape == [256, 64]


# ------------------------------------------------------------------ broken checkpoints
def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope'} does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "file")


def test_directory_without_config(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["mixtral"], tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{path} has no config.json"):
        Checkpoint(path)


def test_directory_without_safetensors(checkpoints, tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(checkpoints["mixtral"] / "config.json", tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"holds no \*\.safetensors files"):
        Checkpoint(tmp_path / "m")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(checkpoints, tmp_path, keep):
    path = copy_ckpt(checkpoints["mixtral"], tmp_path / "m")
    file = path / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(path)
    msg = str(info.value)
    assert str(file) in msg and "truncated" in msg and f"file has {int(size * keep)} bytes" in msg


def test_file_shorter_than_the_length_prefix(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["mixtral"], tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated \(3 bytes\), not a safetensors file"):
        Checkpoint(path)


def test_corrupt_header_length(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["mixtral"], tmp_path / "m")
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef\xde\xad\xbe\xef garbage")
    with pytest.raises(CheckpointError, match=rf"{file}: header length \d+ is impossible"):
        Checkpoint(path)


def test_corrupt_header_json(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints["mixtral"], tmp_path / "m")
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    with pytest.raises(CheckpointError, match=rf"{file}: header is not JSON .*corrupt"):
        Checkpoint(path)


def test_malformed_header_entry(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: malformed header entry for 'w'"):
        Checkpoint(ckpt)


def test_tensor_size_disagrees_with_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'w' has 8 bytes, its shape needs 12"):
        Checkpoint(ckpt)


def test_missing_shard(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints[SHARDED], tmp_path / "q")
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shards that are missing: {shard}"):
        Checkpoint(path)


def test_broken_index(checkpoints, tmp_path):
    path = copy_ckpt(checkpoints[SHARDED], tmp_path / "q")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid safetensors index"):
        Checkpoint(path)


def rewrite_experts(src: Path, dst: Path, convert) -> Path:
    """Copy a single-file checkpoint, applying ``convert(key, tensor)`` to every tensor."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    save_file({k: convert(k, v) for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_int8_experts_are_refused(checkpoints, tmp_path):
    path = rewrite_experts(checkpoints["mixtral"], tmp_path / "q8",
                           lambda k, v: v.to(torch.int8) if ".experts." in k else v)
    with pytest.raises(CheckpointError) as info:
        ExpertStore(Checkpoint(path))
    msg = str(info.value)
    assert msg.startswith("model.layers.") and ".experts." in msg.split(":")[0]
    assert "expert dtype I8 is not supported" in msg and "mxfp4" in msg and "fp8" in msg


def test_one_int8_expert_tensor_is_refused_by_name(checkpoints, tmp_path):
    bad = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    path = rewrite_experts(checkpoints["mixtral"], tmp_path / "q8", lambda k, v: v.to(torch.int8) if k == bad else v)
    with pytest.raises(CheckpointError, match=rf"^{bad}: expert dtype I8 is not supported"):
        ExpertStore(Checkpoint(path))


def test_non_expert_int8_tensor_is_fine(checkpoints, tmp_path):
    """Only expert tensors are checked: an int8 buffer elsewhere does not stop memd."""
    path = rewrite_experts(checkpoints["mixtral"], tmp_path / "ok",
                           lambda k, v: v.to(torch.int8) if k == "model.norm.weight" else v)
    assert ExpertStore(Checkpoint(path)).dtype == "float32"


def test_mixed_expert_dtypes_are_refused(checkpoints, tmp_path):
    path = rewrite_experts(checkpoints["mixtral"], tmp_path / "mixed",
                           lambda k, v: v.half() if k.startswith("model.layers.3.") and ".experts." in k else v)
    with pytest.raises(CheckpointError, match=r"^model\.layers\.\d\.block_sparse_moe\.experts\.\d\.w\d\.weight: expert"
                                              r" dtype F(16|32) differs from the other experts' F(32|16)"
                                              r" \(experts that mix formats"):
        ExpertStore(Checkpoint(path))


def test_missing_expert_tensor(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    dst = tmp_path / "missing"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.6.w3.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"expert 6 of model\.layers\.1\.mlp\.experts has \d+ of its \d+ bytes"):
        ExpertStore(Checkpoint(dst))


def test_wrong_expert_shape(checkpoints, tmp_path):
    bad = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    path = rewrite_experts(checkpoints["mixtral"], tmp_path / "shape", lambda k, v: v[:-1] if k == bad else v)
    with pytest.raises(CheckpointError, match=rf"^{bad}: shape \[127, 64\] does not make gate_up_proj"):
        ExpertStore(Checkpoint(path))
