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


def test_services_started_one_by_one_are_found_by_flag_or_environment(tmp_path):
    """``--url`` with ``--state-dir`` measures a running server's processes, also ones started as ``moeinf memd``
    (not only ``moeinf serve``'s ``python -m services.cli`` children), with the state directory given by the flag
    (``=`` and relative to the process's directory too) or by ``MOEINF_STATE_DIR``; another's are not taken."""
    import os
    import subprocess
    import sys

    from services.bench.soak import service_processes

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    mine, other = tmp_path / "state", tmp_path / "other"
    procs = [subprocess.Popen([*sleep, "/opt/venv/bin/moeinf", "memd", "--state-dir", str(mine)]),
             subprocess.Popen([*sleep, "/opt/venv/bin/moeinf", "worker"], env={**os.environ,
                                                                               "MOEINF_STATE_DIR": str(mine)}),
             subprocess.Popen([*sleep, "-m", "services.cli", "gateway", "--state-dir", str(other)]),
             subprocess.Popen([*sleep, "/opt/venv/bin/moeinf", "gateway", "--state-dir=state"], cwd=tmp_path)]
    try:
        found = service_processes(mine)
        assert {name: p.pid for name, p in found.items()} == {"memd": procs[0].pid, "worker": procs[1].pid,
                                                              "gateway": procs[3].pid}
    finally:
        for p in procs:
            p.kill()
            p.wait()
