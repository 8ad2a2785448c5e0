"""``moeinf bench wire``: the cost of the wire codec, old (reflective, ``wire_legacy.py``) vs new (msgspec structs,
``common/codec.py``), measured side by side in one run.

Two tables: encode+decode ns per message for the hot messages (an acquire, its reply, a step trace of a Mixtral-
shaped model), and the acquire round trip over a real ``ipc://`` DEALER -> ROUTER pair, the server in a thread
decoding the request and encoding the reply as memd does. Old and new alternate repeat by repeat, which goes first
alternating too, so noise from elsewhere hits both alike; each figure is the median of the repeats. The step trace
row compares two layouts as well as two codecs: the old one's nested layers against today's flat arrays
(``messages.step_trace``), as the two versions of the protocol sent them.
"""
from __future__ import annotations

import statistics
import tempfile
import threading
import time

import zmq

from common import codec
from common import messages as m
from common.protocol import Op
from common.zmq_utils import make_socket
from services.bench import wire_legacy as old


def samples(batch: int, layers: int, experts: int, top_k: int) -> dict[str, tuple]:
    """``name -> (op, reply?, new message, old message)``, the same field values in both."""
    reqs = [f"req-{i:04d}" for i in range(batch)]
    routed = list(range(min(experts, top_k * batch)))
    toks = [[(r + e) % 3 for e in routed] for r in range(batch)]
    acq = dict(layer=3, experts=routed, requests=reqs, tokens=toks, step=12345, prefill=[False] * batch,
               speculated=routed[:top_k], speculated_tokens=[batch] * min(top_k, len(routed)), lease=True,
               leased_uses=[[layer, e] for layer in range(2) for e in routed])
    rep = dict(slots=[100 + e for e in routed], hits=len(routed) - 1, revoked=[[1, 2]], epoch=7)
    layer_fields = [dict(layer=i, experts=routed, tokens=toks, weights=[[0.5 * t for t in row] for row in toks],
                         speculated=routed[:top_k], leased=i % 2 == 0) for i in range(layers)]
    trace = dict(worker=4242, step=12345, requests=reqs, tokens=[1] * batch, prefill=[False] * batch)
    return {
        "AcquireRequest": (Op.ACQUIRE, False, m.AcquireRequest(**acq), old.AcquireRequest(**acq)),
        "AcquireReply": (Op.ACQUIRE, True, m.AcquireReply(**rep), old.AcquireReply(**rep)),
        "StepTraceEvent": (Op.STEP_TRACE, False,
                           m.step_trace(**trace, layers=[m.LayerTrace(**f) for f in layer_fields]),
                           old.StepTraceEvent(**trace, layers=[old.LayerTrace(**f) for f in layer_fields])),
    }


def _new_round(op, reply, msg, n: int) -> float:
    t0 = time.perf_counter_ns()
    for i in range(n):
        codec.decode(codec.encode(op, i, msg), reply=reply)
    return (time.perf_counter_ns() - t0) / n


def _old_round(op, msg, n: int) -> float:
    cls = type(msg)
    t0 = time.perf_counter_ns()
    for i in range(n):
        old.decode(old.encode(int(op), i, msg), cls)
    return (time.perf_counter_ns() - t0) / n


def codec_table(cases: dict, n: int, repeats: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for name, (op, reply, new_msg, old_msg) in cases.items():
        assert old.decode(old.encode(int(op), 1, old_msg), type(old_msg))[2] == old_msg
        assert codec.decode(codec.encode(op, 1, new_msg), reply=reply)[2] == new_msg
        each = max(5, min(n, int(0.5e9 / _old_round(op, old_msg, 3))))  # about 0.5 s per old repeat at most
        olds, news = [], []
        for r in range(repeats):
            runs = [lambda: olds.append(_old_round(op, old_msg, each)),
                    lambda: news.append(_new_round(op, reply, new_msg, each))]
            for measure in runs[::-1] if r % 2 else runs:
                measure()
        rows.append((name, len(codec.encode(op, 1, new_msg)), statistics.median(olds), statistics.median(news)))
    return rows


def _serve(sock: zmq.Socket, use_new: bool, reply_new, reply_old, stop: threading.Event) -> None:
    while not stop.is_set():
        if not sock.poll(50):
            continue
        ident, frame = sock.recv_multipart()
        if use_new:
            _, rid, _ = codec.decode(frame, reply=False)
            out = codec.encode(Op.ACQUIRE, rid, reply_new)
        else:
            _, rid, _ = old.decode(frame, old.AcquireRequest)
            out = old.encode(int(Op.ACQUIRE), rid, reply_old)
        sock.send_multipart([ident, out])


def round_trip_us(cases: dict, use_new: bool, n: int) -> float:
    """Median acquire round trip (encode, send, server decode + encode reply, receive, decode), microseconds."""
    op, _, req_new, req_old = cases["AcquireRequest"]
    _, _, rep_new, rep_old = cases["AcquireReply"]
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="moeinf-wire-") as tmp:
        addr = f"ipc://{tmp}/wire.sock"
        server = make_socket(ctx, zmq.ROUTER, addr, bind=True)
        client = make_socket(ctx, zmq.DEALER, addr, bind=False)
        stop = threading.Event()
        thread = threading.Thread(target=_serve, args=(server, use_new, rep_new, rep_old, stop), daemon=True)
        thread.start()
        times = []
        try:
            for i in range(n):
                t0 = time.perf_counter_ns()
                if use_new:
                    client.send(codec.encode(op, i, req_new))
                    codec.decode(client.recv(), reply=True)
                else:
                    client.send(old.encode(int(op), i, req_old))
                    old.decode(client.recv(), old.AcquireReply)
                times.append(time.perf_counter_ns() - t0)
        finally:
            stop.set()
            thread.join()
            client.close()
            server.close()
            ctx.term()
    return statistics.median(times) / 1e3


def run(args) -> int:
    cases = samples(args.batch, args.layers, args.experts, args.top_k)
    print(f"moeinf bench wire: batch {args.batch}, {args.layers} MoE layers x {args.experts} experts, top-{args.top_k};"
          f" up to {args.n} messages x {args.repeats} repeats, old and new alternating (median)")
    print(f"{'message':<16} {'bytes':>6} {'old ns':>9} {'new ns':>9} {'new/old':>8}   (encode + decode, one message)")
    for name, size, o, n in codec_table(cases, args.n, args.repeats):
        print(f"{name:<16} {size:>6} {o:>9.0f} {n:>9.0f} {n / o:>8.3g}")
    print("  (StepTraceEvent: the old codec's nested layers against the new one's flat arrays, codec and layout)")
    olds, news = [], []
    for r in range(args.repeats):
        for use_new in (True, False) if r % 2 else (False, True):
            (news if use_new else olds).append(round_trip_us(cases, use_new, args.n))
    o, n = statistics.median(olds), statistics.median(news)
    print(f"{'acquire RTT ipc':<16} {'':>6} {o:>8.1f}us {n:>8.1f}us {n / o:>8.2f}"
          "   (DEALER -> ROUTER, server in a thread)")
    return 0


def add_parser(bench) -> None:
    p = bench.add_parser("wire", help="wire codec cost: encode+decode ns/message and acquire round trip, old vs new")
    p.add_argument("--batch", type=int, default=8, help="requests in the step")
    p.add_argument("--layers", type=int, default=32, help="MoE layers in a step trace")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("-n", type=int, default=2000, help="messages per repeat (fewer for a message the old codec takes"
                                                        " long over: about 0.5 s per repeat)")
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=run)
