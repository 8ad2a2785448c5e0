"""Service configuration: one frozen dataclass per service, parsed once at the edge.

Every field is a CLI flag (``--expert-memory``) and an environment variable (``MOEINF_EXPERT_MEMORY``); the flag
wins over the variable, which wins over the default. Nothing below ``main()`` reads ``os.environ``.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from common.access import Access
from common.config_checks import (ADMIN_TOKEN_MIN, check_admin_tcp, check_choice, check_log_level, parse_cpus,
                                  resolve_api_key)
from common.knobs import add_config_args as add_config_args, build_config as build_config  # re-exported
from common.knobs import env_name as env_name, flag_name, knob
from common.protocol import PROTOCOL_VERSION as PROTOCOL_VERSION  # re-exported (the wire's vocabulary)
from common.sizes import parse_bytes, parse_size

CPU_EXPERTS = ("off", "auto", "always")  # memd --cpu-experts
POLICIES = ("lru", "lfu", "activation")  # memd's eviction policies (services/memd/policy.py)
POOL_BACKENDS = ("shm", "cuda")  # where memd's expert pool lives (services/memd/pools.py)
EXPERT_FORMATS = ("", "fp8", "mxfp4")  # memd --expert-format: "" serves the experts as stored
SLOT_CACHE = ("auto", "on", "off")  # memd --slot-cache (services/memd/slot_images.py)
SLOT_COMPRESSION = ("off", "zstd")  # memd --slot-compression (services/memd/packed_images.py)
PRELOAD = ("auto", "off")  # memd --preload (services/memd/preload.py)
MATVEC_KERNELS = ("auto", "exact", "fast", "off")  # worker --matvec-kernel (services/worker/matvec.py)
ATTENTION_KERNELS = ("auto", "torch", "exact", "fast")  # worker --attention-kernel (worker/decode_attention.py)


def check_device(device: str) -> None:
    """``--device`` of the worker and of serve: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, not {device!r}")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "moeinf"


MEMD_SOCKET, MEMD_TRACE_SOCKET, WORKER_SOCKET = "memd.sock", "memd-trace.sock", "worker.sock"
ADMIN_SOCKET = "admin.sock"  # memd's admin socket (mode 0600), for `moeinf admin`
WORKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # --worker-id: a file-name part, never a path


def worker_socket(worker_id: str) -> str:
    """The socket file a worker binds in the state directory: worker.sock, or worker-<id>.sock with --worker-id
    (several workers on one memd: the gateway serves through every worker-*.sock it finds there)."""
    return f"worker-{worker_id}.sock" if worker_id else WORKER_SOCKET


def resolve_worker_id(value: str) -> str:
    """``auto`` is the host name (a container's: compose --scale gives every replica its own); else as given."""
    worker_id = socket.gethostname() if value == "auto" else value
    if worker_id and not WORKER_ID.fullmatch(worker_id):
        raise ValueError(f"--worker-id {worker_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return worker_id


def state_socket(state_dir: Path | str, name: str) -> str:
    """The ipc:// address of one of the sockets every service finds in the shared state directory."""
    return f"ipc://{Path(state_dir).resolve() / name}"


@dataclass(frozen=True, slots=True)
class MemdConfig:
    model: Path = knob(None, "Hugging Face checkpoint directory (config.json + *.safetensors)")
    expert_memory: str = knob("100%", "expert pool size: bytes (4GiB, 512MiB) or a share of all expert bytes (25%)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    pool_backend: str = knob("shm", "where the expert pool lives: shm (POSIX shared memory) or cuda (GPU memory"
                                    " shared by CUDA IPC, with a pinned host tier; the worker then computes on that"
                                    " GPU, --device cuda: docs/gpu.md)")
    host_memory: str = knob("0", "cuda backend: pinned host tier caching experts read from disk, bytes (64GiB) or"
                                 " a share of all expert bytes (25%); 0: only the reader's staging (2 slots per"
                                 " reader thread)")
    cuda_device: int = knob(0, "cuda backend: index of the GPU that holds the pool")
    copy_events: str = knob("ipc", "cuda backend: ipc (an acquire is answered once its copies are queued; the"
                                   " worker's stream waits on their events, shared by CUDA IPC) or host (memd waits"
                                   " for the copies before answering)")
    cpu_experts: str = knob("off", "cuda backend: auto (a routed expert only the host tier holds is computed by the"
                                   " worker on its CPU when its measured time beats the copy's), always (every such"
                                   " expert: to compare) or off (every expert is copied to the GPU); auto and always"
                                   " change numerics (docs/gpu.md)")
    read_threads: int = knob(4, "threads reading experts from the checkpoint")
    preload: str = knob("auto", "auto: a pool that holds every expert reads them all at start, in the background"
                                " (every demand read first), as a runtime loads its weights; off: each on first use")
    expert_format: str = knob("", "serve a bf16/fp16/fp32 checkpoint's experts compressed: fp8 or mxfp4 (lossy; each"
                                  " expert converted once, on first read, into <state-dir>/expert-cache/); unset:"
                                  " as stored")
    slot_cache: str = knob("auto", "keep each expert as its slot image in a file under --expert-cache-dir (written"
                                   " behind its first read, or ahead by `moeinf convert`), so later reads go straight"
                                   " into the slot with O_DIRECT, no copy (costs disk: about the experts' size); auto:"
                                   " where the checkpoint's layout would be copied and the disk has room; on; off")
    slot_compression: str = knob("off", "keep the slot images compressed, losslessly (zstd over each unit's high and"
                                        " low bytes: ~0.67 of the bytes of bf16 experts): fewer bytes per read, decoded"
                                        " by memd's reader threads at ~1.9 GB/s per core; off or zstd")
    expert_cache_dir: Path | None = knob(None, "where --slot-cache and --expert-format keep their experts (default:"
                                               " <state-dir>/expert-cache)")
    index_cache_dir: Path | None = knob(None, "where memd caches checkpoint indexes, one small file per checkpoint"
                                              " version, for every state dir (default: in the state directory)")
    direct_io: bool = knob(True, "read experts with O_DIRECT (bypass the page cache) where the file system allows")
    io_cpus: str = knob("", "CPUs memd's threads run on, a Linux CPU list (0-3,8; empty: any): off the worker's"
                            " --cpus, memd's threads do not preempt a decode step")
    read_chunk: str = knob("1MiB", "largest read: an expert is split into pieces of at most this size over the"
                                   " reader threads; an on-demand load waits for at most one piece per thread")
    max_clients: int = knob(16, "most workers attached at once")
    policy: str = knob("activation", "eviction policy: lru, lfu or activation (furthest expected next use:"
                                     " cyclic layer distance, measured reuse, predicted need)")
    prefetch: bool = knob(True, "prefetch the experts the EAMC match and the next-gate guess predict")
    prefetch_window: int = knob(4, "lookahead in MoE layers (across the step boundary into the next step)")
    prefetch_threshold: float = knob(0.3, "predicted probability of use below which an expert is not prefetched")
    prefetch_budget: str = knob("auto", "bytes in flight for prefetches: auto (read bandwidth x time per layer x"
                                        " window), a size (64MiB) or a share of the expert pool (25%)")
    eamc_capacity: int = knob(256, "finished requests' activation matrices kept in the EAMC (persisted in the state"
                                   " directory)")
    eamc_dir: Path | None = knob(None, "the only directory `moeinf admin eamc save|load` may write or read (default:"
                                       " the state directory)")
    eamc_from: str = knob("", "at start, merge a peer's EAMC into this one: tcp://HOST:PORT (a peer memd's --admin-tcp,"
                              " asked with --admin-token) or an eamc.bin file; ours stay, bounded by --eamc-capacity")
    eamc_top: int = knob(4, "EAMC members whose weighted average predicts a request's experts")
    max_traced_requests: int = knob(1024, "live requests memd tracks an activation matrix for")
    admin_tcp: str = knob("", "also serve the admin socket on HOST:PORT over TCP (needs --admin-token); the Unix"
                              " socket <state-dir>/admin.sock is always there")
    metrics_port: int = knob(0, "serve memd's Prometheus metrics at http://<--metrics-host>:PORT/metrics (0: off)")
    metrics_host: str = knob("127.0.0.1", "address of the --metrics-port listener (0.0.0.0: every interface)")
    group: str = knob("", "sockets, shared memory and state files are the owner's only (0600); with a group name they"
                          " are also that group's (0660), for services run by different users of it")
    admin_token: str = knob("", f"token every TCP admin request must carry (at least {ADMIN_TOKEN_MIN} characters;"
                                " prefer the env variable to the flag)")
    log_level: str = knob("info", "debug, info, warning, error or critical")

    def __post_init__(self):
        check_log_level(self)
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        Access(self.group)  # an unknown group fails here, with its name
        for name in ("eamc_dir", "expert_cache_dir", "index_cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        check_admin_tcp(self.admin_tcp, self.admin_token)
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port {self.metrics_port}: a TCP port (1-65535), or 0 for no metrics endpoint")
        if self.eamc_from.startswith("tcp://") and len(self.admin_token) < ADMIN_TOKEN_MIN:
            raise ValueError(f"--eamc-from {self.eamc_from} needs --admin-token (env MOEINF_ADMIN_TOKEN): the peer's"
                             " admin token, which the fleet shares")
        if self.read_threads < 1 or self.max_clients < 1:
            raise ValueError("--read-threads and --max-clients must be >= 1")
        if self.cuda_device < 0:
            raise ValueError(f"--cuda-device {self.cuda_device}: a GPU's index is >= 0")
        check_choice(self.pool_backend, POOL_BACKENDS, "--pool-backend")
        if self.host_memory.strip() != "0":
            parse_size(self.host_memory, what="--host-memory")
        if self.copy_events not in ("ipc", "host"):
            raise ValueError(f"--copy-events {self.copy_events!r}: choose ipc or host")
        if self.pool_backend == "shm" and self.cuda_device != 0:
            raise ValueError("--cuda-device picks the cuda backend's GPU; with --pool-backend shm there is none: leave"
                             " it at 0")
        if self.pool_backend == "shm" and self.copy_events != "ipc":
            raise ValueError("--copy-events orders the cuda backend's copies; with --pool-backend shm the reader"
                             " writes the pool itself: leave it at ipc")
        check_choice(self.cpu_experts, CPU_EXPERTS, "--cpu-experts")
        if self.pool_backend == "shm" and self.cpu_experts != "off":
            raise ValueError("--cpu-experts computes the cuda backend's host-tier experts on the CPU; with"
                             " --pool-backend shm every expert is computed on the CPU already: leave it off")
        if self.pool_backend == "shm" and self.host_memory.strip() != "0":
            raise ValueError("--host-memory is the cuda backend's host tier; with --pool-backend shm the pool is"
                             " host memory already: leave it at 0")
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"--expert-format {self.expert_format!r}: choose fp8 or mxfp4, or leave it unset")
        check_choice(self.slot_cache, SLOT_CACHE, "--slot-cache")
        check_choice(self.slot_compression, SLOT_COMPRESSION, "--slot-compression")
        check_choice(self.preload, PRELOAD, "--preload")
        if self.slot_compression != "off" and (self.slot_cache == "off" or self.expert_format):
            raise ValueError(f"--slot-compression {self.slot_compression} compresses the slot images: it needs"
                             " --slot-cache auto or on, and no --expert-format")
        check_choice(self.policy, POLICIES, "--policy")
        if self.prefetch_window < 1 or self.eamc_capacity < 1 or self.eamc_top < 1 or self.max_traced_requests < 1:
            raise ValueError("--prefetch-window, --eamc-capacity, --eamc-top and --max-traced-requests must be >= 1")
        if not 0 < self.prefetch_threshold <= 1:
            raise ValueError("--prefetch-threshold must be in (0, 1]")
        parse_size(self.expert_memory, what="--expert-memory")  # malformed: refused before the checkpoint is indexed
        parse_bytes(self.read_chunk, what="--read-chunk")
        parse_cpus(self.io_cpus, "--io-cpus")
        if self.prefetch_budget != "auto":
            parse_size(self.prefetch_budget, what="--prefetch-budget")

    @property
    def rpc_addr(self) -> str:
        return state_socket(self.state_dir, MEMD_SOCKET)

    @property
    def trace_addr(self) -> str:
        return state_socket(self.state_dir, MEMD_TRACE_SOCKET)

    @property
    def admin_addr(self) -> str:
        return state_socket(self.state_dir, ADMIN_SOCKET)


KV_AUTO_SHARE = 0.8  # of the memory available once the model is loaded: the worker's --kv-cache-memory auto


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: Path = knob(None, "Hugging Face checkpoint directory (the one memd serves)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    max_model_len: int = knob(0, "longest prompt + completion in tokens (0: the model's max_position_embeddings)")
    max_queued: int = knob(64, "most generation requests waiting in the worker before it refuses new ones")
    max_running: int = knob(8, "most requests batched together (each holds a KV cache); more wait in the queue")
    kv_cache_memory: str = knob("auto", "KV cache the running requests may hold together, each counted at its prompt"
                                        " + max_tokens (bytes per token measured on the caches): a size (4GiB), a"
                                        " share of the memory available once the model is loaded (50%), or auto (80%"
                                        " of it); a request waits until it fits, one above it all runs alone")
    max_step_tokens: int = knob(512, "most tokens in one forward pass: decode tokens plus prompt chunks; at least"
                                     " --max-prefill-chunk + --max-running")
    max_prefill_chunk: int = knob(256, "longest piece of a prompt prefilled in one step; longer prompts take several"
                                       " steps, so running requests keep decoding meanwhile")
    threads: int = knob(0, "torch intra-op threads (0: one per --cpus CPU, else torch's default)")
    cpus: str = knob("", "CPUs the worker's threads run on, a Linux CPU list (0-3,8; empty: any); at least --threads,"
                         " and --threads 0 means one per CPU")
    device: str = knob("cpu", "where the worker computes: cpu, or cuda / cuda:N (dense weights, KV cache and the"
                              " experts' matmuls on that GPU; needs memd --pool-backend cuda on the same GPU)")
    handshake_timeout_s: float = knob(60.0, "seconds to wait for memd during start-up")
    memd_timeout_s: float = knob(120.0, "seconds one expert acquire may take before memd is declared dead")
    record_trace: Path | None = knob(None, "write every token's routing to this file (JSON Lines, docs/traces.md)")
    next_gate: bool = knob(True, "guess the next MoE layers' experts with their routers on this layer's input and"
                                 " tell memd (one small matmul per layer)")
    speculate_layers: int = knob(4, "most MoE layers ahead a layer guesses (memd picks how many within this, from"
                                    " read time vs layer time); 0: none")
    dequant_cache_mb: int = knob(0, "quantized experts: MiB of dequantized experts kept beyond one layer's (the"
                                    " newest row is reused first; a hit skips the dequantization; 0: one layer's)")
    dequant_scratch_experts: int = knob(0, "quantized experts: experts the dequantization scratch holds (0: a layer's"
                                           " experts, up to the pool's slots); fewer saves memory, and a step that"
                                           " routes more runs its experts in groups, same results")
    dequant_kernel: str = knob("auto", "quantized experts: auto (a C kernel built on first use with the system's C"
                                       " compiler, $CC or cc, into --kernel-cache-dir and checked against"
                                       " torch's ops; torch's ops, 2-3x slower, when none builds), c (the kernel or a"
                                       " start-up error) or torch")
    kernel_cache_dir: Path | None = knob(None, "where the C kernels built on first use are kept, in kernels-<uid>/"
                                               " (one library per source, compiler and CPU; default: the state"
                                               " directory): workers of several state dirs build them once")
    prepack_dense: bool = knob(False, "bfloat16 on CPU: pack bias-free dense linears once for oneDNN, not per call"
                                      " (7-11% faster decode, measured; a rounding tie can go unlike eager's)")
    matvec_kernel: str = knob("auto", "bfloat16 decode steps' expert and dense products in moeinf's own kernels,"
                                      " reading each weight once in place: exact (torch's own summation order, so"
                                      " tokens are eager's bit for bit: ATen's on AVX2, oneDNN's on AVX-512 BF16;"
                                      " checked against torch at start), fast (another order, ~20% faster on AVX2,"
                                      " FP8/MXFP4 experts from their bytes; tokens may differ from eager's),"
                                      " auto (exact where its check holds, else torch's products) or off; not off:"
                                      " the RMSNorms too, one call each, bit for bit their own (checked per module)")
    attention_kernel: str = knob("auto", "decode attention on CPU, one-token steps: exact (moeinf's kernel with"
                                         " sdpa's own bits, checked against torch at start; where the model attends"
                                         " with sdpa, without a mask: 5-12x faster attention), fast (moeinf's"
                                         " float32 kernel, any sdpa or eager model: ~10x faster at 2k tokens; sums"
                                         " in another order, so tokens may differ from eager's), torch (the"
                                         " model's own) or auto (exact where its check holds, else torch)")
    matmul_cache: int = knob(128, "bfloat16 on CPU: most oneDNN matmul kernels kept compiled, one per shape (a weight"
                                  " and a row count, ~0.6 MiB each; batching meets new ones as long as it runs, so"
                                  " this bounds the worker's memory); 0: oneDNN's own bound (1024)")
    leases: bool = knob(True, "keep the experts memd granted until it revokes them, so a layer whose experts are all"
                              " held costs no message (off: one acquire and one release per MoE layer)")
    early_experts: bool = knob(True, "a lone decode token's layer whose experts are not all resident computes the"
                                     " resident ones while memd loads the others (same results; needs the"
                                     " one-call experts path of --matvec-kernel); off: it waits for all")
    group: str = knob("", "sockets, shared memory and state files are the owner's only (0600); with a group name they"
                          " are also that group's (0660), for services run by different users of it")
    worker_id: str = knob("", "name of this worker when several share one memd: it serves <state-dir>/worker-<id>.sock"
                              " (auto: the host name, one per container under compose --scale); empty: worker.sock")
    log_level: str = knob("info", "debug, info, warning, error or critical")

    def __post_init__(self):
        check_log_level(self)
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "worker_id", resolve_worker_id(self.worker_id))
        for name in ("record_trace", "kernel_cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        Access(self.group)
        for name in ("max_queued", "max_running", "max_step_tokens", "max_prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"--threads {self.threads}: give a count of threads, or 0 for one per --cpus CPU")
        if 0 < len(cpus := parse_cpus(self.cpus)) < self.threads:
            raise ValueError(f"--threads {self.threads} on --cpus {self.cpus!r} ({len(cpus)} CPU(s)): threads would"
                             " take turns on a CPU; give as many CPUs as threads, or fewer threads")
        if self.max_step_tokens < self.max_prefill_chunk + self.max_running:
            raise ValueError(f"--max-step-tokens ({self.max_step_tokens}) must be >= --max-prefill-chunk"
                             f" ({self.max_prefill_chunk}) + --max-running ({self.max_running}), so that a prompt"
                             " chunk always fits next to the running requests' decode tokens")
        if self.kv_cache_memory != "auto":
            parse_size(self.kv_cache_memory, what="--kv-cache-memory")
        for name in ("handshake_timeout_s", "memd_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag_name(name)} must be > 0 (seconds)")
        for name in ("speculate_layers", "dequant_cache_mb", "dequant_scratch_experts", "matmul_cache",
                     "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag_name(name)} must be >= 0")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"--attention-kernel must be one of {', '.join(ATTENTION_KERNELS)}, not"
                             f" {self.attention_kernel!r}")
        if self.matvec_kernel not in MATVEC_KERNELS:
            raise ValueError(f"--matvec-kernel must be {', '.join(MATVEC_KERNELS)}, not {self.matvec_kernel!r}")
        check_device(self.device)
        if self.dequant_kernel not in ("auto", "c", "torch"):
            raise ValueError(f"--dequant-kernel must be auto, c or torch, not {self.dequant_kernel!r}")

    @property
    def kernel_dir(self) -> Path:
        """The directory whose kernels-<uid>/ holds the compiled kernels (--kernel-cache-dir, else --state-dir)."""
        return self.kernel_cache_dir or self.state_dir

    @property
    def memd_rpc_addr(self) -> str:
        return state_socket(self.state_dir, MEMD_SOCKET)

    @property
    def memd_trace_addr(self) -> str:
        return state_socket(self.state_dir, MEMD_TRACE_SOCKET)

    @property
    def rpc_addr(self) -> str:
        return state_socket(self.state_dir, worker_socket(self.worker_id))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    model: Path = knob(None, "checkpoint directory (its tokenizer is used; the worker serves the weights)")
    served_model_name: str = knob("", "model id clients send (default: the checkpoint directory's name)")
    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "HTTP port")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    max_queued: int = knob(32, "requests admitted at once (running or waiting); beyond it the gateway answers 429")
    max_tokens_limit: int = knob(4096, "largest max_tokens a request may ask for")
    max_body_bytes: int = knob(1 << 20, "largest request body in bytes (413 above)")
    step_timeout_s: float = knob(600.0, "seconds without a token from the worker before a request fails with 503"
                                        " (and is cancelled on the worker)")
    body_timeout_s: float = knob(30.0, "seconds a client may take to send its request body (408 after)")
    stream_write_timeout_s: float = knob(60.0, "seconds a stream's client may leave a chunk unread (the connection's"
                                               " buffers full) before the gateway drops it as gone and cancels its"
                                               " generation")
    header_timeout_s: float = knob(10.0, "seconds a client may take to send a request's headers, counted from the"
                                         " connection's start or its previous response (the connection is closed"
                                         " after); also how long an idle keep-alive connection stays open")
    api_key: str = field(default="", repr=False, metadata={"help": "when set, /v1/* needs 'Authorization: Bearer"
                         " <key>' (prefer MOEINF_API_KEY or --api-key-file: a flag shows in ps)"})
    api_key_file: Path | None = knob(None, "file whose content (stripped) is the API key")
    metrics_auth: bool = knob(False, "/metrics needs the API key too")
    cors_origins: str = knob("", "comma-separated origins allowed by CORS ('*': any); none by default")
    affinity_entries: int = knob(4096, "conversations (same 'user', else same prompt prefix) remembered with the worker"
                                       " that served them, so the next turn goes there too (least recently used go)")
    affinity_slack_tokens: int = knob(1024, "a conversation leaves its worker for the least-loaded one when its"
                                            " worker has more than this many outstanding tokens above that one's")
    tokenizer_cache: int = knob(256, "words the tokenizer's BPE/Unigram cache keeps (tokenizers' own bound: 10000;"
                                     " a SentencePiece-style tokenizer caches each short prompt whole, ~3.5 KiB, so"
                                     " that bound grows the gateway by ~35 MiB); 0: none")
    log_level: str = knob("info", "debug, info, warning, error or critical")

    def __post_init__(self):
        check_log_level(self)
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        resolve_api_key(self)
        if self.metrics_auth and not self.api_key:
            raise ValueError("--metrics-auth needs an API key (--api-key, --api-key-file or MOEINF_API_KEY)")
        if not (self.body_timeout_s > 0 and self.header_timeout_s > 0 and self.step_timeout_s > 0
                and self.stream_write_timeout_s > 0):
            raise ValueError("--body-timeout-s, --header-timeout-s, --step-timeout-s and --stream-write-timeout-s must"
                             " be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: a TCP port is 0-65535")
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes {self.max_body_bytes}: at least 1 (no unlimited setting)")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model.resolve().name)
        if self.max_queued < 1 or self.max_tokens_limit < 1 or self.affinity_entries < 1:
            raise ValueError("--max-queued, --max-tokens-limit and --affinity-entries must be >= 1")
        if self.affinity_slack_tokens < 0 or self.tokenizer_cache < 0:
            raise ValueError("--affinity-slack-tokens and --tokenizer-cache must be >= 0")

    @property
    def cors_allowed(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())

    @property
    def worker_addr(self) -> str:
        return state_socket(self.state_dir, WORKER_SOCKET)
