"""Reading a Hugging Face checkpoint directory without loading it.

``Checkpoint`` parses every safetensors header once (single file or sharded with
``model.safetensors.index.json``) into absolute byte ranges, and checks them against the file sizes so a
truncated or corrupt file fails at start-up with its name. ``MoeModel`` builds the model on the meta device
(no memory) to find the experts modules, which must use transformers' ``ExpertsInterface``, and maps
checkpoint keys to model parameters with transformers' own conversion mapping.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_DTYPES = {  # safetensors dtype -> (torch dtype name, bytes per element)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
EXPERT_DTYPES = frozenset({"F32", "F16", "BF16"})
# Quantized expert formats served, by quant_method of config.json's quantization_config ("" = not quantized).
SUPPORTED_FORMATS = {"": "unquantized float32/float16/bfloat16",
                     "mxfp4": "mxfp4 (*_blocks + *_scales, GPT-OSS)",
                     "fp8": "block-wise fp8 (float8_e4m3fn + weight_scale_inv, quant_method fp8 with"
                            " weight_block_size)"}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint directory cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    file: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes), not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {header_len} is impossible for a {size}-byte file"
                                  " (corrupt or truncated)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: header is not JSON ({exc}); the file is corrupt") from None
    base = 8 + header_len
    entries = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}") from None
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {base + end} but the file has {size} bytes"
                                  " (truncated download?)")
        if dtype in SAFETENSORS_DTYPES:
            expected = SAFETENSORS_DTYPES[dtype][1]
            for d in shape:
                expected *= d
            if expected != end - begin:
                raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes, its shape needs {expected}")
        entries[key] = TensorEntry(str(path), dtype, shape, base + begin, end - begin)
    return entries


class Checkpoint:
    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint {self.dir} does not exist or is not a directory")
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} has no config.json: point --model at a Hugging Face checkpoint"
                                  " directory")
        self.files = self._shard_files()
        self.tensors: dict[str, TensorEntry] = {}
        for path in self.files:
            self.tensors.update(read_header(path))

    def _shard_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files = sorted({self.dir / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir} holds no *.safetensors files (only safetensors checkpoints are served)")
        return files

    def quant_format(self) -> tuple[str, tuple[int, int] | None]:
        """``(format, fp8 weight_block_size)`` from config.json's ``quantization_config``; an unsupported
        quantization is refused with its name and the supported ones."""
        return quant_format(json.loads((self.dir / "config.json").read_text()), self.dir)

    def load_config(self):
        from transformers import AutoConfig

        from common.families import remote_code_reason, unsupported_reason

        if reason := remote_code_reason(self.dir / "config.json"):
            raise CheckpointError(reason)
        try:
            config = AutoConfig.from_pretrained(self.dir, trust_remote_code=False)
        except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
            raise CheckpointError(f"{self.dir}/config.json cannot be loaded by transformers: {exc}") from None
        if reason := unsupported_reason(config.model_type):
            raise CheckpointError(reason)
        return config


def supported_formats() -> str:
    return "; ".join(SUPPORTED_FORMATS.values())


def quant_format(config: dict, where) -> tuple[str, tuple[int, int] | None]:
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        return "", None
    method = str(qc.get("quant_method") or qc.get("format") or "unknown").lower()
    if method not in SUPPORTED_FORMATS or method == "":
        raise CheckpointError(f"{where}: quantization {method!r} is not supported; moeinf serves {supported_formats()}")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}: fp8 without a 2-D weight_block_size (per-tensor or per-channel fp8,"
                                  f" got {block!r}) is not supported; moeinf serves {supported_formats()}")
        if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
            raise CheckpointError(f"{where}: fp8 fmt {qc.get('fmt')!r} is not supported (e4m3 is)")
        return method, (block[0], block[1])
    return method, None


ROUTER_TOP_K = {"switch_transformers": 1, "nllb-moe": 2}  # routers whose config does not say (top-1, top-2 routers)


TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_topk", "moe_k")  # by family


def experts_per_token(config) -> int:
    """Top-k of the router: the text config's ``num_experts_per_tok`` or the name its family gives it (Gemma 4's
    ``top_k_experts``, ERNIE's ``moe_k``, Hunyuan's ``moe_topk``, ...; a per-layer list: its largest); the family's
    router where the config does not say; 2 for a family not known."""
    text = config.get_text_config()
    for name in TOP_K_NAMES:
        value = getattr(text, name, None)
        if value:
            return max(value) if isinstance(value, (list, tuple)) else int(value)
    return ROUTER_TOP_K.get(config.model_type) or 2


def max_positions(config) -> int:
    """The longest sequence the model takes: ``max_position_embeddings`` (4096 where the config does not say)."""
    return getattr(config.get_text_config(), "max_position_embeddings", None) or 4096


@dataclass(frozen=True, slots=True)
class ExpertParam:
    name: str  # attribute of the experts module, e.g. "gate_up_proj"
    shape: tuple[int, ...]  # per expert (leading experts dim removed)
    dtype: str  # torch dtype name


@dataclass(frozen=True, slots=True)
class MoeLayer:
    index: int  # MoE layer number, 0.. in model order
    module: str  # qualified name of the experts module
    num_experts: int
    params: tuple[ExpertParam, ...]
    keyed: bool = False  # one expert module per key of an nn.ModuleDict (params named inside one expert)
    transposed: bool = False  # the 2-D parameters are [in, out] (transformers' ``is_transposed``), else [out, in]


def model_class(config):
    """The transformers class that generates text for ``config``: its causal-LM class, or for an encoder-decoder
    model (Switch Transformers, NLLB-MoE) its sequence-to-sequence class."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def build_meta_model(config):
    """The model on the meta device: structure and shapes only, no memory."""
    import torch

    try:
        with torch.device("meta"):
            return model_class(config).from_config(config)
    except ValueError as exc:
        raise CheckpointError(f"transformers has no generation class for model type {config.model_type!r}: {exc}"
                              ) from None


def is_experts_module(module) -> bool:
    """An experts module decorated with ``@use_experts_implementation`` (transformers' ``ExpertsInterface``)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "num_experts"))


EXPERT_KEY = re.compile(r"(?:expert_)?(\d+)")  # the key of one expert in an nn.ModuleDict of experts


def keyed_experts(module) -> list:
    """The expert modules of an ``nn.ModuleDict`` of experts, in key order (other children, such as a dropout,
    left out)."""
    return [child for key, child in module.items() if EXPERT_KEY.fullmatch(key)]


def is_experts_dict(module) -> bool:
    """Experts kept as one module per expert in an ``nn.ModuleDict`` (Switch Transformers, NLLB-MoE), called one
    expert at a time by the dict's own forward."""
    from torch import nn

    return (isinstance(module, nn.ModuleDict) and isinstance(getattr(module, "num_experts", None), int)
            and module.num_experts > 0 and len(keyed_experts(module)) == module.num_experts)


def find_moe_layers(model) -> list[MoeLayer]:
    layers = []
    for name, module in model.named_modules():
        if is_experts_module(module):
            params = _stacked_params(name, module)
        elif is_experts_dict(module):
            params = _keyed_params(name, module)
        else:
            continue
        layers.append(MoeLayer(len(layers), name, module.num_experts, params, is_experts_dict(module),
                               bool(getattr(module, "is_transposed", False))))
    if not layers:
        cls = type(model).__name__
        raise CheckpointError(f"{cls} (model type {model.config.model_type!r}) has no experts module using"
                              " transformers' ExpertsInterface (@use_experts_implementation) or an nn.ModuleDict of"
                              " experts, so"
                              " moeinf cannot offload its experts")
    shapes = {(l.num_experts, l.params, l.transposed) for l in layers}
    if len(shapes) != 1:
        raise CheckpointError("MoE layers differ in expert count or shape; moeinf needs one slot size for all")
    return layers


def _stacked_params(name: str, module) -> tuple[ExpertParam, ...]:
    params = tuple(ExpertParam(pname, tuple(p.shape[1:]), str(p.dtype).removeprefix("torch."))
                   for pname, p in module.named_parameters(recurse=False))
    if not params or any(p.shape[0] != module.num_experts for _, p in module.named_parameters(recurse=False)):
        raise CheckpointError(f"experts module {name} ({type(module).__name__}) does not stack its parameters by"
                              " expert; moeinf cannot slice it")
    return params


def _keyed_params(name: str, module) -> tuple[ExpertParam, ...]:
    """One expert module per key: the parameters of one (``fc1.weight``, ...), the same for every expert."""
    shapes = {tuple((n, tuple(p.shape), p.dtype) for n, p in expert.named_parameters())
              for expert in keyed_experts(module)}
    if len(shapes) != 1:
        raise CheckpointError(f"experts of {name} ({type(module).__name__}) differ in parameters or shapes; moeinf"
                              " needs one slot size for all")
    return tuple(ExpertParam(n, shape, str(dtype).removeprefix("torch.")) for n, shape, dtype in shapes.pop())


def expert_key_owner(target: str, keyed: dict[str, MoeLayer]) -> tuple[MoeLayer, int, str] | None:
    """``(layer, expert, parameter)`` when ``target`` names a parameter of one expert of a keyed MoE layer
    (``{module}.{expert key}.{param}``, e.g. ``...ffn.experts.expert_3.fc1.weight``); None otherwise."""
    parts = target.split(".")
    for cut in range(len(parts) - 2, 0, -1):
        layer = keyed.get(".".join(parts[:cut]))
        if layer is not None:
            match = EXPERT_KEY.fullmatch(parts[cut])
            return (layer, int(match.group(1)), ".".join(parts[cut + 1:])) if match else None
    return None


def in_experts(target: str, expert_modules: set[str], keyed: set[str] | frozenset = frozenset()) -> bool:
    """Whether parameter ``target`` is an expert parameter: one of a stacked experts module's own, or any inside
    one of the ``keyed`` experts modules (one module per expert)."""
    if target.rpartition(".")[0] in expert_modules - set(keyed):
        return True
    parts = target.split(".")
    return any(".".join(parts[:cut]) in keyed for cut in range(len(parts) - 1, 0, -1))


class KeyMapper:
    """Maps checkpoint keys to model parameter names with transformers' own conversion mapping."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.meta_state_dict = dict.fromkeys(model.state_dict().keys(), True)
        self.prefix = model.base_model_prefix

    def map(self, key: str) -> tuple[str, object | None, str | None]:
        """Return ``(model key, converter or None, the converter source pattern that matched)``."""
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta_state_dict)
        if target not in self.meta_state_dict and key in self.meta_state_dict:  # as transformers: a rename too broad
            target, pattern = rename_source_key(key, [], [], self.prefix, self.meta_state_dict)  # for this key
        if pattern is None:
            return target, None, None
        converter = next(c for c in self.converters if pattern in c.source_patterns)
        return target, converter, pattern

    def renamed(self, key: str) -> str:
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(key, self.renamings)


def expert_number(renamed_key: str, pattern: str) -> int:
    """The expert index the ``*`` of a converter source pattern matched in ``renamed_key``."""
    regex = re.escape(pattern.removeprefix("^").replace("\\.", ".")).replace(r"\*", r"(\d+)")  # regex or plain
    m = re.search(regex, renamed_key)
    if not m:
        raise CheckpointError(f"cannot find the expert number in {renamed_key!r} (pattern {pattern!r})")
    return int(m.group(1))


def split_part(key: str, fmt: str) -> tuple[str, str]:
    """``(the weight's own key, part)``: part is "values", or "blocks"/"scales" for a quantized companion
    (``*_blocks``/``*_scales`` in an mxfp4 checkpoint, ``*.weight_scale_inv`` in an fp8 one)."""
    if fmt == "mxfp4" and key.endswith("_blocks"):
        return key.removesuffix("_blocks"), "blocks"
    if fmt == "mxfp4" and key.endswith("_scales"):
        return key.removesuffix("_scales"), "scales"
    if fmt == "fp8" and key.endswith(".weight_scale_inv"):
        return key.removesuffix("_scale_inv"), "scales"
    return key, "values"

