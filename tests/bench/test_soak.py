"""``moeinf bench soak`` against a server it starts (real memd, worker and gateway): ~10 s with 4 clients, no
error, both kinds of request measured, and an RSS row for every service at every sample."""
import re

from services.cli import main
from common.demo_model import DemoSize, write_demo_model


def test_soak_runs_clean_and_reports_rss_of_every_service(tmp_path, capsys):
    model = write_demo_model(tmp_path / "demo", DemoSize(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2,
                                                         dtype="float32"))
    code = main(["bench", "soak", "--model", str(model), "--clients", "4", "--duration", "10", "--sample-s", "2",
                 "--max-tokens", "8", "--startup-timeout-s", "300"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"requests: \d+ \((\d+) ok, 0 errors\)", out), out
    assert "latency plain" in out and "latency stream" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\.\d+\s", line)]
    assert len(rows) >= 5, out  # every 2 s over 10 s, and the last
    for row in rows:
        rss = [float(v) for v in row[1:4]]  # gateway, worker, memd: each found and measured
        assert all(v > 10 for v in rss), row
    assert int(rows[-1][4]) > 4  # requests completed by the end
