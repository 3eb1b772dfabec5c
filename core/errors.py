"""One small error tree, shared by the server, the pollers and the edge agent.
Client errors (the caller sent something wrong) are kept apart from server
errors (we cannot serve right now); the device side (a reader, the address
policy) and the agent's sender have their own branches."""


class HaltlessError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(HaltlessError):
    """A setting (environment variable, CLI flag, config file) is invalid."""


class ClientError(HaltlessError):
    """The request is wrong; the message says what, where and what is allowed."""

    status = 400

    def headers(self) -> list[tuple[bytes, bytes]] | None:
        """Response headers that go with the answer."""
        return None


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

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())]


class Unprocessable(ClientError):
    status = 422


class Unauthorized(ClientError):
    status = 401


class NotFound(ClientError):
    status = 404


class MethodNotAllowed(ClientError):
    """The path exists, not with this method; ``allowed`` are the ones it has."""

    status = 405

    def __init__(self, method: str, allowed: list[str]) -> None:
        super().__init__(f"method {method} not allowed here; allowed: {', '.join(allowed)}")
        self.allowed = allowed

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allowed).encode())]


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


# ------------------------------------------------------------------ devices

class TargetRefused(HaltlessError):
    """The address policy refuses this host; str() says why and how to allow it."""


class ReaderError(HaltlessError):
    """The device could not be read at all (connect, auth, security, timeout).

    ``str(exc)`` is a sentence a person can act on, e.g.
    "connection refused by 127.0.0.1:5020 - is the device on and listening?".
    """


class DeviceUnreachable(ReaderError):
    """Nothing answered at the device's address (connection refused, no
    route): trying again costs the device nothing, so reconnects back off to
    10 s at most instead of 60 (``pollers/backoff.py``)."""


# ------------------------------------------------------------------ the edge agent's sender

class SendError(HaltlessError):
    """A batch the edge agent pushed was not accepted."""


class BatchRejected(SendError):
    """The server will never take this batch (4xx other than 401/429)."""


class KeyRefused(SendError):
    """The server refused the API key (401): sending stops, the queue stays."""


class RetryLater(SendError):
    """The server cannot be reached, or asked us to come back (429, 5xx);
    ``after`` is its Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after
