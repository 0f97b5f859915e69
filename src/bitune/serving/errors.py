"""Errors answered with an OpenAI error body (``{"error": {"message", "type", "param", "code"}}``), and the
handlers that turn every failure of a request into one: a bad request is a 4xx and the server keeps serving."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorBody, ErrorResponse

_KINDS = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}


class OpenAIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> ErrorResponse:
        kind = _KINDS.get(self.status, "invalid_request_error")
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, HTTP errors and unexpected failures of ``app`` with OpenAI error bodies."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return OpenAIError(
            400, f"{where}: {message}" if where else message, where, "invalid_request"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return OpenAIError(500, f"{type(exc).__name__}: {exc}").response()
