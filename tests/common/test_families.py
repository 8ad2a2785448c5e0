"""common/families.py: remote-code and unsupported-family refusals, and docs/families.md kept up to date."""
import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import moeinf_cmd

from common import families
from common.checkpoint import Checkpoint, CheckpointError

ROOT = Path(__file__).resolve().parents[2]


def _with_auto_map(model_dir: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_grok1.Grok1Config",
                          "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_grok1.py").write_text("raise SystemExit('checkpoint code was executed')\n")
    return model_dir


def test_remote_code_checkpoint_is_refused_by_memd_and_worker(mixtral, tmp_path):
    import shutil

    model = _with_auto_map(Path(shutil.copytree(mixtral, tmp_path / "grok")))
    for service in ("memd", "worker"):
        result = subprocess.run(moeinf_cmd(service, "--model", str(model), "--state-dir", str(tmp_path / "state"),
                                           *(("--handshake-timeout-s", "5") if service == "worker" else ())),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "needs remote code" in result.stderr and "modeling_grok1.Grok1ModelForCausalLM" in result.stderr
        assert "checkpoint code was executed" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


def test_unsupported_family_is_refused_with_its_reason(mixtral, monkeypatch):
    monkeypatch.setitem(families.UNSUPPORTED, "mixtral", "a reason the matrix found")
    with pytest.raises(CheckpointError, match="'mixtral' is not supported by moeinf yet: a reason the matrix found"):
        Checkpoint(mixtral).load_config()


def test_supported_family_loads(mixtral):
    assert Checkpoint(mixtral).load_config().model_type == "mixtral"


def test_no_code_ever_passes_trust_remote_code_true():
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    offenders = [str(p) for d in ("common", "services") for p in (ROOT / d).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert not offenders


def test_unsupported_families_are_experts_families():
    assert set(families.UNSUPPORTED) <= set(families.experts_families())


def test_docs_table_is_generated_from_the_list_and_the_matrix_results():
    results = json.loads((ROOT / "docs/families.json").read_text())
    assert (ROOT / "docs/families.md").read_text() == families.markdown(results), \
        "docs/families.md is stale: run `moeinf families --markdown > docs/families.md`"


def test_markdown_shows_every_family_and_new_ones_as_not_run():
    rows = families.family_rows({})
    assert {r[0] for r in rows} == set(families.experts_families())
    assert all(r[2] in ("not run", "refused") for r in rows)
