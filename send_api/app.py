"""The Starlette application: each route's handler wrapped in one place that times it, counts its outcome
(``smsgw_api_requests_total``), turns a rejection into the API's own answer and logs it as one line (never a
body, never a key)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from send_api import kannel, metrics, rapidpro, rest
from send_api.accept import Rejected
from send_api.openapi import DOCUMENT
from send_api.web import Answer, ApiContext, json_error
from services import liveness

log = logging.getLogger(__name__)

Handler = Callable[[Request, ApiContext], Awaitable[Answer]]
HEARTBEAT_S = 5.0  # the event loop stamps the liveness heartbeat this often (a stuck loop stops it)


def _endpoint_of(request: Request) -> str:
    return str(request.path_params.get("endpoint", ""))[:64]


def _served(
    api: str, handler: Handler, ctx: ApiContext, on_error: Callable[[Rejected], Response]
) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        started = time.monotonic()
        try:
            answer = await handler(request, ctx)
        except Rejected as exc:
            answer = Answer(on_error(exc), exc.outcome if exc.outcome != "not_found" else None, _endpoint_of(request))
            level = logging.WARNING if exc.status >= 500 else logging.INFO
            log.log(
                level,
                "send_api: %s request %s %s refused (%s, HTTP %d): %s; nothing new queued%s",
                api,
                request.method,
                request.url.path[:80],
                exc.outcome,
                exc.status,
                exc.reason,
                ", the caller may retry" if exc.retry_after_s is not None else "",
            )
        except Exception:  # one broken request must not take the server down; the caller retries on 5xx
            log.exception("send_api: %s request %s failed unexpectedly; nothing new queued", api, request.url.path)
            answer = Answer(on_error(Rejected("error", 500, "internal error")), "error")
        if answer.outcome is not None:
            metrics.REQUESTS.labels(api, answer.outcome).inc()
            metrics.REQUEST_SECONDS.labels(api).observe(time.monotonic() - started)
        return answer.response

    return serve


async def _openapi(_request: Request) -> Response:
    return JSONResponse(DOCUMENT)


@contextlib.asynccontextmanager
async def _heartbeat(_app: Starlette) -> AsyncIterator[None]:
    """Stamp the liveness heartbeat from the event loop while the app runs (services/liveness.py)."""

    async def beat() -> None:
        while True:
            liveness.beat()
            await asyncio.sleep(HEARTBEAT_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        liveness.done()


def build_app(ctx: ApiContext, *, heartbeat: bool = True) -> Starlette:
    """The application serving the three APIs over ``ctx``."""
    routes = [
        Route("/rapidpro/{endpoint}", _served("rapidpro", rapidpro.send, ctx, json_error), methods=["POST"]),
        Route(
            "/cgi-bin/sendsms", _served("kannel", kannel.sendsms, ctx, kannel.error_response), methods=["GET", "POST"]
        ),
        Route("/api/v1/messages", _served("rest", rest.send, ctx, json_error), methods=["POST"]),
        Route("/api/v1/messages/{message_id}", _served("rest", rest.lookup, ctx, json_error), methods=["GET"]),
        Route("/api/v1/openapi.json", _openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=_heartbeat if heartbeat else None)
