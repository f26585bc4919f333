"""The rule that says whether a receiver's answer acknowledges a delivery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidings.errors import InvalidInput

_BOM = "\ufeff"


@dataclass(frozen=True)
class SuccessRule:
    """Any 2xx by default; with `token`, a 2xx whose trimmed body equals the token."""

    token: str | None = None

    @classmethod
    def parse(cls, value: Any) -> SuccessRule:
        """Accept '2xx', {'token': 'success'} or None."""
        if value is None or value == "2xx":
            return cls()
        if isinstance(value, dict) and set(value) == {"token"} and isinstance(value["token"], str):
            token = value["token"].strip()
            if token:
                return cls(token)
        raise InvalidInput(
            'success: expected "2xx" or {"token": "<text>"} with a non-empty token',
            field="success",
        )

    def to_json(self) -> str | dict[str, str]:
        """The rule as the API writes it."""
        return {"token": self.token} if self.token else "2xx"

    def accepts(self, status_code: int, body_head: bytes) -> bool:
        """Whether this answer is an acknowledgement. Redirects never are."""
        if not 200 <= status_code <= 299:
            return False
        if self.token is None:
            return True
        text = body_head.decode("utf-8", errors="replace").strip()
        if text.startswith(_BOM):
            text = text[len(_BOM) :].strip()
        return text == self.token
