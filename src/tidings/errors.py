"""One tree of errors; the docstring of each class is its default message."""

from __future__ import annotations


class TidingsError(Exception):
    """Something went wrong in Tidings."""

    code = "tidings_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigurationError(TidingsError):
    """The configuration is invalid; fix the setting named in the message."""

    code = "configuration_error"


class InvalidInput(TidingsError):
    """The request is invalid; correct the field named in the message."""

    code = "invalid_input"

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidDuration(InvalidInput):
    """A duration must be a number followed by s, m or h, e.g. '30s', '5m' or '2h'."""

    code = "invalid_duration"


class InvalidSchedule(InvalidInput):
    """A retry schedule must be a preset name or a non-empty list of durations."""

    code = "invalid_schedule"


class BlockedDestination(InvalidInput):
    """The destination is not a public address; set TIDINGS_ALLOW_PRIVATE_NETWORKS=true
    for local development."""

    code = "blocked_destination"


class PayloadTooLarge(TidingsError):
    """The payload is larger than the configured maximum."""

    code = "payload_too_large"


class NotFound(TidingsError):
    """No such object; check the id."""

    code = "not_found"


class Conflict(TidingsError):
    """The request conflicts with the current state."""

    code = "conflict"


class StoreUnavailable(TidingsError):
    """The store could not be reached; check TIDINGS_DATABASE_URL and that the database runs."""

    code = "store_unavailable"


class BrokerUnavailable(TidingsError):
    """The broker could not be reached; check TIDINGS_BROKER_URL and that the broker runs."""

    code = "broker_unavailable"


class SignatureError(TidingsError):
    """The webhook signature does not verify."""

    code = "invalid_signature"


class Unauthenticated(TidingsError):
    """Send an API key as `Authorization: Bearer <key>`; `tidings keys create` makes one."""

    code = "unauthenticated"


class Forbidden(TidingsError):
    """This API key's scope does not allow the request; use a key with the right scope."""

    code = "forbidden"
