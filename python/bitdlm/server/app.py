"""The FastAPI app: wires the routes to the serving class (serving.py), maps
every error to OpenAI's error JSON, and adds the middleware. Heavy request work
runs in serving.py's thread pool; the engine thread (engine_loop.py) runs the
forwards."""
# (no `from __future__ import annotations`: FastAPI resolves the route
# annotations, and `Request` is imported inside create_app)
import contextlib
import logging

from .errors import APIError
from .middleware import Gate
from .responses import error_response
from .schemas import validation_error
from .config import MAX_BODY_BYTES, ServerConfig  # noqa: F401  (re-exported: bitdlm.server.app)
from .serving import OpenAIServing, render_chat  # noqa: F401

log = logging.getLogger("bitdlm.server")


def create_app(engine, tokenizer, config: ServerConfig, *, model=None):
    """The FastAPI app serving `engine` (also what a Ray Serve replica wraps).
    The engine thread starts and stops with the app's lifespan; `app.state`
    holds engine_loop, metrics, config and serving."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    serving = OpenAIServing(engine, tokenizer, config, model=model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.start()
        try:
            await serving.ready()  # the adaptive policy's calibration, before serving
            yield
        finally:
            await serving.stop()

    app = FastAPI(title="bitdlm", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.state.engine_loop = serving.engine_loop
    app.state.metrics = serving.metrics
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))

    app.add_middleware(Gate, metrics=serving.metrics, engine_loop=serving.engine_loop,
                       api_key=config.api_key)

    @app.get("/health")
    async def health():
        return serving.health()

    @app.get("/metrics")
    async def get_metrics():
        data, ctype = serving.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/generation/algorithms")
    async def generation_algorithms():
        from .. import decoding  # the unmasking rules and cache strategies a request may pick

        return decoding.describe()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": serving.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        serving.check_model(model_id)
        return serving.model_card(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat_completions(request)

    @app.post("/generate")
    async def generate(request: Request):  # the users' old (SGLang-style) route
        return await serving.generate(request)

    return app
