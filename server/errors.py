"""One small error tree. Client errors (the caller sent something wrong) are
kept apart from server errors (we cannot serve right now)."""


class HaltlessError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(HaltlessError):
    """A setting (environment variable, CLI flag, config file) is invalid."""


class ClientError(HaltlessError):
    """The request is wrong; the message says what, where and what is allowed."""

    status = 400


class PayloadTooLarge(ClientError):
    status = 413


class RequestTimeout(ClientError):
    status = 408


class UnsupportedMediaType(ClientError):
    status = 415


class TooManyRequests(ClientError):
    """Over a rate limit; ``retry_after`` says in how many seconds to retry."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unprocessable(ClientError):
    status = 422


class Unauthorized(ClientError):
    status = 401


class NotFound(ClientError):
    status = 404


class Conflict(ClientError):
    status = 409


class ServerError(HaltlessError):
    """We could not do it; the caller may retry."""


class Overloaded(ServerError):
    """This worker holds as much as it may (request bodies in memory); retry
    after ``retry_after`` seconds."""

    retry_after = 1


class ClientGone(HaltlessError):
    """A request body ended before its end: the client went away, or its
    chunked framing was malformed (granian reports both the same way)."""


class DatabaseUnavailable(ServerError):
    """PostgreSQL cannot be reached; nothing of the request was stored."""


class SchemaTooNew(ServerError):
    """The database was migrated by a newer haltless than this one."""
