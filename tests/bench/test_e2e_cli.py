"""``moeinf bench e2e`` on a tiny checkpoint: the table and the JSON have the promised shape (timings are not
checked), the greedy outputs with several clients equal those with one, and memd and the worker are stopped."""
import json
import os
import subprocess

from helpers import moeinf_cmd, orphan_regions, write_family

ROW_KEYS = {"system", "ttft_s", "decode_ms_per_token_p50", "decode_ms_per_token_p90", "tokens_per_s",
            "bytes_read_per_token", "hit_rate"}


def test_table_and_json(tmp_path):
    model = write_family("mixtral", tmp_path / "m")
    out = tmp_path / "e2e.json"
    tmp = tmp_path / "t"
    tmp.mkdir()
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), "--systems", "moeinf", "--expert-memory", "100%",
                     "--concurrency", "1", "3", "--requests", "5", "--max-tokens", "6", "--threads", "1",
                     "--json", str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert "3 clients:" in proc.stdout and "same tokens as 1 client" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["disk_read_gbps"] > 0 and isinstance(doc["memory_limit_bytes"], (int, type(None)))
    rows = doc["systems"]
    assert [(r["system"], r["concurrency"]) for r in rows] == [("moeinf", 1), ("moeinf", 3)]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["tokens_per_s"] > 0 and r["generated_tokens"] == 5 * 6
        assert r["decode_ms_per_token_p90"] >= r["decode_ms_per_token_p50"] > 0 and 0 <= r["hit_rate"] <= 1
    assert rows[1]["same_tokens_as_c1"] is True
    assert list(tmp.iterdir()) == [] and not orphan_regions(), "the bench left a state directory or a pool"
