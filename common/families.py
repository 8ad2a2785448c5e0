"""Which MoE families moeinf serves: the installed transformers' ExpertsInterface families, and the exceptions.

``experts_families()`` finds every model type whose modeling file uses ``@use_experts_implementation`` and that has
a causal-LM class, so a new transformers release shows its new families without a code change here.
``UNSUPPORTED`` is the one list of families that cannot work yet, each with its reason; memd and the worker refuse
them at start-up with that reason (``check_servable``), and docs/families.md is generated from it.
"""
from __future__ import annotations

import json
from pathlib import Path

# model type -> why moeinf cannot serve it yet (found by tests/worker/test_family_matrix.py)
UNSUPPORTED: dict[str, str] = {}


# text-to-text (encoder-decoder) families whose requests name the language to write: it is the output's first token
# (generate's forced_bos_token_id), a language code of the model's tokenizer
TARGET_LANGUAGE = frozenset({"nllb-moe"})


def experts_families() -> dict[str, str]:
    """``{model type: causal-LM class name}`` for every family whose experts use transformers' ExpertsInterface.

    Several model types that map to one class (a multimodal model's text part) are listed once, by the text type;
    multimodal wrappers (``...ForConditionalGeneration``) are left out: their text model type is listed.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    modules = {p.parent.name for p in root.glob("*/modeling_*.py")
               if "@use_experts_implementation" in p.read_text(errors="replace")}
    found: dict[str, str] = {}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if not (cls or "").endswith("ForCausalLM") or model_type_to_module_name(model_type) not in modules:
            continue
        twin = next((t for t, c in found.items() if c == cls), None)
        if twin is None:
            found[model_type] = cls
        elif model_type == f"{twin}_text":  # the text config of a multimodal wrapper: the one a text LM loads
            found = {model_type if t == twin else t: c for t, c in found.items()}
    return found


def keyed_families() -> dict[str, str]:
    """``{model type: sequence-to-sequence class name}`` for the encoder-decoder families whose experts are an
    ``nn.ModuleDict`` of expert modules (Switch Transformers, NLLB-MoE): served by the worker's keyed binding."""
    import re

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    keyed = re.compile(r"class \w+Experts\(nn\.ModuleDict\)")
    modules = {p.parent.name for p in root.glob("*/modeling_*.py") if keyed.search(p.read_text(errors="replace"))}
    return {t: c for t, c in sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.items())
            if t in CONFIG_MAPPING_NAMES and model_type_to_module_name(t) in modules}


def remote_code_reason(config_path: Path) -> str | None:
    """Why a checkpoint needing remote code is refused, or None. Read as plain JSON: nothing from the directory runs."""
    try:
        raw = json.loads(Path(config_path).read_text())
    except (OSError, ValueError):
        return None  # transformers' own loading reports the broken file
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not auto_map:
        return None
    classes = ", ".join(sorted({str(v) for v in auto_map.values()})) if isinstance(auto_map, dict) else str(auto_map)
    return (f"{config_path} needs remote code (auto_map: {classes}); moeinf never executes code from a checkpoint"
            " directory: serve a checkpoint of a family built into transformers")


def unsupported_reason(model_type: str) -> str | None:
    reason = UNSUPPORTED.get(model_type)
    if reason is None:
        return None
    return f"model type {model_type!r} is not supported by moeinf yet: {reason} (see docs/families.md)"


def family_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """``(model type, class, status, reason)`` for every family: refused ones from ``UNSUPPORTED``, the others
    from the matrix results (``{model type: {"status", "reason"}}``), "not run" where the matrix has no result."""
    rows = []
    for model_type, cls in experts_families().items():
        if model_type in UNSUPPORTED:
            rows.append((model_type, cls, "refused", UNSUPPORTED[model_type]))
            continue
        result = results.get(model_type, {})
        rows.append((model_type, cls, result.get("status", "not run"), result.get("reason", "")))
    return rows


def markdown(results: dict) -> str:
    import transformers

    rows = family_rows(results)
    passed = sum(r[2] == "pass" for r in rows)
    lines = [
        "# MoE families",
        "",
        "<!-- generated by `moeinf families --markdown --results docs/families.json`; do not edit by hand -->",
        "",
        f"Every model type of transformers {transformers.__version__} whose experts use the ExpertsInterface"
        " (`@use_experts_implementation`) and that has a causal-LM class. *pass*: greedy tokens through memd + worker"
        " at 25% expert memory equal `model.generate`, alone and batched (tests/worker/test_family_matrix.py, tiny"
        " random checkpoints, sharded); *refused*: memd and the worker refuse it at start-up with the reason"
        " (common/families.py). Checkpoints that need remote code (`auto_map` in config.json) are always refused.",
        "",
        f"{passed} of {len(rows)} families pass.",
        "",
        "| family | class | status | reason |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {c} | {s} | {r.replace('|', '/')} |" for t, c, s, r in rows]
    lines += [
        "",
        "## Encoder-decoder families with one module per expert",
        "",
        "Model types whose experts are an `nn.ModuleDict` of expert modules (the MoE-Infinity paper's own models)."
        " memd reads each expert's own tensors; the worker rebinds the dict's forward (services/worker/keyed.py) and"
        " runs the encoder once per request, then one decoder token per step with the request's cross-attention"
        " cache (services/worker/seq2seq.py). The decoder forwards of a step's requests (each its own cross-attention)"
        " meet at every MoE layer, where one acquire and one pass of each routed expert serve them all. Served"
        " through /v1/completions, text to text; NLLB-MoE needs"
        " `target_language`. *pass*: tests/worker/test_seq2seq.py, greedy tokens at 25% equal `model.generate`,"
        " alone and with three requests in flight.",
        "",
        "| family | class | status | reason |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {c} | {results.get(t, {}).get('status', 'not run')} | {results.get(t, {}).get('reason', '')} |"
              for t, c in keyed_families().items()]
    return "\n".join(lines) + "\n"


def run_cli(args) -> int:
    results = json.loads(Path(args.results).read_text()) if args.results and Path(args.results).is_file() else {}
    if args.markdown:
        print(markdown(results), end="")
        return 0
    for model_type, cls, status, reason in family_rows(results):
        print(f"{model_type:22} {cls:32} {status:8} {reason}")
    return 0
