"""``moeinf serve``'s configuration (common/config.py holds the services' own): the three services as supervised
child processes, one flag and one ``MOEINF_*`` variable per field, parsed once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.access import Access
from common.config import EXPERT_FORMATS, POLICIES, SLOT_COMPRESSION, check_device, default_state_dir
from common.config_checks import check_choice, check_log_level, resolve_api_key
from common.knobs import knob


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """``moeinf serve``: the three services as supervised child processes."""

    model: Path | None = knob(None, "checkpoint directory; without it the demo model is built once and served")
    expert_memory: str = knob("25%", "expert pool size: bytes (4GiB, 512MiB) or a share of all expert bytes (25%)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    host: str = knob("127.0.0.1", "address the gateway listens on")
    port: int = knob(8000, "gateway HTTP port")
    served_model_name: str = knob("", "model id clients send (default: the checkpoint directory's name)")
    max_queued: int = knob(32, "requests admitted at once (running or waiting); beyond it the gateway answers 429;"
                                " also each worker's --max-queued")
    demo_dir: Path = knob(Path(".cache/demo-model"), "where the demo model is built when --model is not given")
    startup_timeout_s: float = knob(600.0, "seconds the services (started together) may take to become ready")
    max_restarts: int = knob(5, "restarts of a crashing service within --restart-window-s before serve gives up")
    restart_window_s: float = knob(600.0, "sliding window of --max-restarts: crashes older than this are forgotten,"
                                          " so a service that crashes now and then is restarted for ever")
    policy: str = knob("activation", "memd's eviction policy: lru, lfu or activation")
    device: str = knob("cpu", "cpu, or cuda / cuda:N: the expert pool in that GPU's memory (memd --pool-backend cuda,"
                              " its pinned host tier sized by MOEINF_HOST_MEMORY) and the worker computing there")
    prefetch: bool = knob(True, "memd prefetches predicted experts")
    expert_format: str = knob("", "memd serves a bf16 checkpoint's experts compressed: fp8 or mxfp4 (lossy); unset: as"
                                  " stored")
    slot_compression: str = knob("off", "memd keeps its slot images compressed, losslessly: zstd (~0.67 of the bytes"
                                        " of bf16 experts, decoded by its reader threads) or off")
    record_trace: Path | None = knob(None, "the worker writes every token's routing to this file (docs/traces.md)")
    workers: int = knob(1, "worker processes on the one memd (one expert pool): worker-0.sock ... when above 1; the"
                           " gateway routes each request to one of them")
    group: str = knob("", "sockets, shared memory and state files are the owner's only (0600); with a group name they"
                          " are also that group's (0660), for services run by different users of it")
    api_key: str = field(default="", repr=False, metadata={"help": "the gateway's API key: /v1/* needs 'Authorization:"
                         " Bearer <key>' (handed to the gateway in its environment, never on its command line; prefer"
                         " MOEINF_API_KEY or --api-key-file: a flag shows in ps)"})
    api_key_file: Path | None = knob(None, "file whose content (stripped) is the gateway's API key")
    log_level: str = knob("info", "debug, info, warning, error or critical")

    def __post_init__(self):
        check_log_level(self)
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"--expert-format {self.expert_format!r}: choose fp8 or mxfp4, or leave it unset")
        object.__setattr__(self, "demo_dir", Path(self.demo_dir))
        resolve_api_key(self)
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        if self.record_trace is not None:
            object.__setattr__(self, "record_trace", Path(self.record_trace))
        Access(self.group)
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.record_trace is not None and self.workers > 1:
            raise ValueError("--record-trace writes one file: use it with --workers 1")
        if self.max_restarts < 0 or not self.restart_window_s > 0 or not self.startup_timeout_s > 0:  # (NaN too)
            raise ValueError("--max-restarts must be >= 0, and --restart-window-s and --startup-timeout-s > 0")
        if not 1 <= self.port <= 65535:  # (0, any free port, would leave serve not knowing where to probe)
            raise ValueError(f"--port {self.port}: serve's gateway port is 1-65535")
        check_device(self.device)
        if self.expert_format and self.device != "cpu":
            raise ValueError(f"--expert-format {self.expert_format} with --device {self.device}: quantized experts in a"
                             " GPU pool are not supported yet; serve them with --device cpu")
        check_choice(self.policy, POLICIES, "--policy")
        if self.slot_compression not in SLOT_COMPRESSION or (self.slot_compression != "off" and self.expert_format):
            raise ValueError(f"--slot-compression {self.slot_compression!r}: off or zstd, and zstd compresses the"
                             " lossless slot images (not with --expert-format)")
