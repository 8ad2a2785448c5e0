"""A stand-in for llama.cpp's ``llama-server`` in tests: the flags ``bench e2e`` passes, ``/health`` and a streamed
``/completion`` with ``return_tokens`` (each generated token is the previous one plus 1, from the prompt's last).
Every request's body and the command line are appended to ``$FAKE_LLAMA_LOG`` (JSON lines). ``$FAKE_LLAMA_HOLD``:
indices of generated tokens held back (no chunk of their own, as llama-server does for a token ending inside a UTF-8
character); ``$FAKE_LLAMA_SHORT``: generate that many tokens fewer than asked; ``$FAKE_LLAMA_ERROR``: answer with an
``error`` event instead."""
import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def log(entry: dict) -> None:
    if os.environ.get("FAKE_LLAMA_LOG"):
        with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
            f.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"status":"ok"}' if self.path == "/health" else b"{}"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log({"request": request})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if os.environ.get("FAKE_LLAMA_ERROR"):
            self._chunk_line(f"error: {json.dumps({'code': 500, 'message': os.environ['FAKE_LLAMA_ERROR']})}")
            self.wfile.write(b"0\r\n\r\n")
            return
        hold = {int(i) for i in os.environ.get("FAKE_LLAMA_HOLD", "").split(",") if i}
        token = request["prompt"][-1]
        n = request["n_predict"] - int(os.environ.get("FAKE_LLAMA_SHORT", "0"))
        for i in range(n):
            token = (token + 1) % 320
            if i in hold:
                continue
            self._chunk({"content": "x", "tokens": [token], "stop": False, "tokens_predicted": i + 1})
        self._chunk({"content": "", "tokens": [], "stop": True, "tokens_predicted": n, "stop_type": "limit"})
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: dict) -> None:
        self._chunk_line(f"data: {json.dumps(data)}")

    def _chunk_line(self, line: str) -> None:
        payload = f"{line}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-c", type=int)
    p.add_argument("-np", type=int)
    p.add_argument("-t", type=int)
    p.add_argument("-tb", type=int)
    p.add_argument("--no-webui", action="store_true")
    p.add_argument("--cache-ram", type=int)
    args = p.parse_args()
    log({"argv": sys.argv[1:]})
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
