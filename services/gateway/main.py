"""``moeinf gateway``: the HTTP front end (needs a running worker)."""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from common.config import GatewayConfig
from services.gateway.app import build_app
from services.gateway.app_keys import GATEWAY
from services.gateway.errors import GatewayRunner
from services.gateway.guard import exposure_warning
from services.gateway.text import TextCodec

log = logging.getLogger("moeinf.gateway")


def run(cfg: GatewayConfig) -> int:
    codec = TextCodec(cfg.model, cfg.tokenizer_cache)
    if not codec.cache_bounded:
        log.debug("--tokenizer-cache: this tokenizer has no word cache to bound (WordPiece, WordLevel, a slow one)")
    asyncio.run(_serve(cfg, codec))
    return 0


async def _serve(cfg: GatewayConfig, codec: TextCodec) -> None:
    app = build_app(cfg, codec)
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror}); pick another --port") from None
    log.info("gateway ready on http://%s:%d serving %s", cfg.host, cfg.port, cfg.served_model_name)
    if (warning := exposure_warning(cfg)) is not None:
        log.warning("%s", warning)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        app[GATEWAY].abort_requests("the server is shutting down; retry shortly")
    finally:
        await runner.cleanup()
