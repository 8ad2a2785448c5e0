"""The baselines of ``moeinf bench e2e``: what a transformers user runs, each in its own process.

* ``transformers-resident``: ``from_pretrained(dtype="auto")``, every weight in memory (a reference; not a floor:
  moeinf's own kernels decode faster; the compute floor is ``e2e_floor.py``'s);
* ``accelerate-offload``: ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``,
  what a transformers user does when the model does not fit: accelerate keeps whole decoder layers in memory up
  to the budget and streams the others from disk (memory-mapped) at every forward.

The parent starts ``python -m services.bench.baselines`` (inside the system's memory cgroup, if any). The child
loads the model once, warms up with one request outside the workloads (and, for ``--warm-eamc``, the workload
once, untimed: the same treatment as moeinf), then serves each repeat's workload (as many repeats as moeinf
gets, each its own prompts) one request at a time through the same greedy loop as ``moeinf bench overhead``
(``services.worker.engine.Engine``), and writes every request's send time, token arrival times and tokens to a
JSON file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.bench.service_proc import exited_with

RESIDENT, OFFLOAD = "transformers-resident", "accelerate-offload"


def accelerate_missing() -> str | None:
    """Why the accelerate baseline cannot run, or None."""
    if importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (pip install 'moeinf[bench]'): accelerate-offload skipped"
    return None


@dataclass(frozen=True)
class Job:
    """What a baseline child runs."""

    system: str
    model: Path
    workloads: list[list[list[int]]]  # one per repeat
    warmup: list[int]
    warmup_tokens: int
    max_tokens: int
    threads: int
    cpu_bytes: int | None  # accelerate's max_memory["cpu"]
    warm_workload: list[list[int]] | None = None  # --warm-eamc: served once, untimed, after the warm-up


@dataclass
class BaselineRun:
    runs: list[list[dict]]  # per repeat, per request: sent, arrivals, tokens
    load_s: float
    placement: dict[str, int]  # accelerate: modules per device ("cpu", "disk")
    rss_bytes: int  # the child's resident set at the end
    rss_anon_bytes: int = 0  # of which anonymous memory
    rss_file_bytes: int = 0  # and file-backed pages outside the checkpoint (libraries)
    anon_weight_bytes: int = 0  # the parameters it holds in anonymous memory (not mapped from the checkpoint)


def run_baseline(job: Job, prefix: list[str] = (), timeout_s: float = 3600.0) -> BaselineRun:
    """Run ``job`` in a child process started with ``prefix`` (e.g. a cgroup's); raise with its log if it fails."""
    work = Path(tempfile.mkdtemp(prefix="moeinf-baseline-"))
    try:
        spec = {**job.__dict__, "model": str(job.model), "offload_folder": str(work / "offload"),
                "out": str(work / "out.json")}
        (work / "job.json").write_text(json.dumps(spec))
        cmd = [*prefix, sys.executable, "-m", "services.bench.baselines", str(work / "job.json")]
        with open(work / "log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout_s)
            except BaseException:  # timeout, Ctrl-C: the child goes too
                proc.kill()
                proc.wait()
                raise
        if code != 0:
            tail = "\n".join((work / "log").read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{job.system} {exited_with(code)}:\n{tail}")
        doc = json.loads((work / "out.json").read_text())
        return BaselineRun(doc["runs"], doc["load_s"], doc["placement"], doc["rss_bytes"], doc["rss_anon_bytes"],
                           doc["rss_file_bytes"], doc["anon_weight_bytes"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- child
def load_model(spec: dict):
    from transformers import AutoModelForCausalLM

    if spec["system"] == RESIDENT:
        return AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto").eval()
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto", device_map="auto",
                                                max_memory={"cpu": spec["cpu_bytes"]},
                                                offload_folder=spec["offload_folder"]).eval()


def serve(engine, prompt: list[int], max_tokens: int) -> dict:
    from common import messages as m

    seq = engine.start(m.GenerateRequest("bench", prompt, max_tokens))
    timing = {"sent": time.perf_counter(), "arrivals": [], "tokens": []}
    while seq.finish_reason is None:
        timing["tokens"].append(engine.step(seq))
        timing["arrivals"].append(time.perf_counter())
    return timing


def child_main(job_file: str) -> int:
    import psutil
    import torch

    from common.checkpoint import max_positions
    from services.bench.e2e_runtime import ProcMemory, anonymous_parameter_bytes, checkpoint_files, mapped_ranges
    from services.worker.engine import Engine

    spec = json.loads(Path(job_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = load_model(spec)
    load_s = time.perf_counter() - start
    placement: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    max_len = max_positions(model.config)
    engine = Engine(model, max_len)
    serve(engine, spec["warmup"], spec["warmup_tokens"])
    for prompt in spec["warm_workload"] or []:
        serve(engine, prompt, spec["max_tokens"])
    runs = [[serve(engine, prompt, spec["max_tokens"]) for prompt in workload] for workload in spec["workloads"]]
    rss = psutil.Process().memory_info().rss  # anonymous memory plus mapped file pages it touched
    files = checkpoint_files(Path(spec["model"]))
    memory = ProcMemory.of(skip=files)
    weights = anonymous_parameter_bytes(model, mapped_ranges(files))
    Path(spec["out"]).write_text(json.dumps({"runs": runs, "load_s": load_s, "placement": placement,
                                             "rss_bytes": rss, "rss_anon_bytes": memory.anon,
                                             "rss_file_bytes": memory.file, "anon_weight_bytes": weights}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one baseline run of moeinf bench e2e (started by the bench)")
    parser.add_argument("job")
    sys.exit(child_main(parser.parse_args().job))
