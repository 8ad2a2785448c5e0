"""Where the worker computes (``--device``): the CPU, or the GPU that holds memd's device pool (docs/gpu.md).

On ``cuda`` the dense weights, the KV cache and every step tensor live on the GPU and the experts' matmuls run on
the pool's slots through CUDA IPC views (``pool_views.CudaPoolViews``); sampling reads the step's logits back to
the host, as on the CPU. Ordering against memd's writes is the worker's one host synchronisation per MoE layer:
reading the routed ids (``Routing.of``) waits for everything queued before it, the previous layer's expert
matmuls included, so by the time an acquire reaches memd (the only moment memd takes a lease back) no kernel still
reads a slot memd could rewrite. An explicit release (``--leases off``) does not wait: the worker records one of its
"done reading" events (``ReadEvents``, shared with memd at HELLO) after the layer's kernels and names it in the
release, and memd's copy stream waits on it before rewriting those slots (write-after-read, on the GPU).
Read-after-write: memd answers an acquire once its copies into the slots are queued, naming the entries of its
copy-event ring still in flight, and the layer's stream waits on them before the expert matmuls
(``CudaPoolViews.wait``); with ``--copy-events host`` memd answers once the copies have completed.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

READ_EVENTS = 64  # "done reading" events per worker (entries reused in turn)


def resolve(name: str) -> torch.device:
    """``--device`` as a torch device, its GPU made current; an error that says what to fix when it has none."""
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: torch sees no CUDA device (a CPU build of torch, no driver, or"
                           " CUDA_VISIBLE_DEVICES is empty); run the worker with --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name}: this host has {torch.cuda.device_count()} visible GPU(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def hello_name(device: torch.device) -> str:
    """What HELLO says the worker computes on: "cpu", or its GPU's UUID (memd's pool maps to that GPU only)."""
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device).uuid)


def check_family(model, layers, device: torch.device) -> None:
    """On a GPU the worker serves decoder-only models whose experts are one module (transformers' ExpertsInterface);
    the others (encoder-decoder, one module per expert) build their step tensors on the host: refused by name."""
    if device.type == "cpu":
        return
    kind = model.config.model_type
    if getattr(model.config, "is_encoder_decoder", False) or any(layer.keyed for layer in layers):
        raise RuntimeError(f"--device {device}: {kind} (encoder-decoder, or experts kept one module per expert)"
                           " is served on the CPU only in this version; run the worker with --device cpu")


def place(model, device: torch.device) -> int:
    """Move every materialised parameter and buffer to ``device`` (the experts stay on meta: they are memd's);
    tied parameters stay one tensor. Returns the bytes moved."""
    if device.type == "cpu":
        return 0
    moved: dict[int, nn.Parameter] = {}
    nbytes = 0
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or param.is_meta:
                continue
            if id(param) not in moved:
                moved[id(param)] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
                nbytes += param.numel() * param.element_size()
            module._parameters[name] = moved[id(param)]
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)
    return nbytes


def current(device: torch.device):
    """A context making ``device`` the current GPU in the calling thread (``set_device`` is per thread: the compute
    thread and the lockstep threads are not the one that loaded the model); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def broken(device: torch.device) -> str | None:
    """Why ``device`` can no longer compute, or None: after a failed step, a CUDA context that a sticky error
    (an illegal address, a device-side assert, a lost GPU) left unusable fails even a synchronize. The CPU never is."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the context is gone
        return f"{type(exc).__name__}: {exc}"
    return None


class ReadEvents:
    """The worker's "done reading" events: interprocess CUDA events, their handles sent to memd in HELLO, recorded in
    turn after a layer's expert matmuls. Reusing an entry is safe: memd's copy stream waits on an entry's latest
    record, which on this worker's in-order stream comes after every earlier one."""

    def __init__(self, device: torch.device, size: int = READ_EVENTS):
        stream = torch.cuda.current_stream(device)
        self.events = [torch.cuda.Event(interprocess=True) for _ in range(size)]
        for event in self.events:
            event.record(stream)  # created on this device (a handle needs the event to exist)
        self.handles = [bytes(event.ipc_handle()) for event in self.events]
        self.next = 0

    def record(self, device: torch.device) -> list[int]:
        """The entry recorded after the work queued so far on ``device``'s stream ([] after a CUDA error: nothing
        runs any more, and the first error is reported)."""
        i, self.next = self.next, (self.next + 1) % len(self.events)
        try:
            self.events[i].record(torch.cuda.current_stream(device))
        except RuntimeError:
            return []
        return [i]


def release_ready(tensor: torch.Tensor) -> None:
    """Before telling memd a slot may be rewritten: the GPU's kernels queued so far (that read it) have run."""
    if tensor.is_cuda:
        try:
            torch.cuda.current_stream(tensor.device).synchronize()
        except RuntimeError:  # a CUDA error (the context is dead, nothing runs any more): the first error is reported
            pass
