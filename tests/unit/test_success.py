"""The success rule: any 2xx by default, or a 2xx whose trimmed body is the token."""

from __future__ import annotations

import pytest

from tidings.errors import InvalidInput
from tidings.success import SuccessRule

BOM = "\ufeff"


@pytest.mark.parametrize("status_code", [200, 201, 202, 204, 299])
def test_any_2xx_is_a_success_by_default(status_code: int) -> None:
    assert SuccessRule().accepts(status_code, b"")
    assert SuccessRule().accepts(status_code, b"whatever the receiver says")


@pytest.mark.parametrize("status_code", [199, 300, 301, 302, 307, 400, 500])
def test_anything_but_2xx_is_not_a_success(status_code: int) -> None:
    assert not SuccessRule().accepts(status_code, b"success")


@pytest.mark.parametrize(
    "body",
    [
        b"success",
        b"  success\n",
        (BOM + "success").encode("utf-8"),
        (BOM + " success\r\n").encode("utf-8"),
        b"\tsuccess  ",
        b"\xef\xbb\xbfsuccess\n",
    ],
    ids=["bare", "padded", "bom", "bom and padding", "tab", "bom as raw bytes"],
)
def test_the_token_rule_accepts_the_token_after_trimming_whitespace_and_a_bom(
    body: bytes,
) -> None:
    assert SuccessRule("success").accepts(200, body)


@pytest.mark.parametrize(
    "body",
    [
        b"?success",
        b'{"ok":false}',
        b"successful",
        b"",
        b"SUCCESS",
        b"success success",
        b"fail",
        b"\xffsuccess",
    ],
)
def test_the_token_rule_refuses_any_other_body(body: bytes) -> None:
    assert not SuccessRule("success").accepts(200, body)


@pytest.mark.parametrize("status_code", [199, 302, 400, 500, 503])
def test_the_token_with_a_status_other_than_2xx_is_not_a_success(status_code: int) -> None:
    assert not SuccessRule("success").accepts(status_code, b"success")


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (None, SuccessRule()),
        ("2xx", SuccessRule()),
        ({"token": "success"}, SuccessRule("success")),
        ({"token": "  OK \n"}, SuccessRule("OK")),
    ],
)
def test_the_rule_parses_from_its_api_form(value: object, rule: SuccessRule) -> None:
    assert SuccessRule.parse(value) == rule


def test_the_rule_writes_its_api_form() -> None:
    assert SuccessRule().to_json() == "2xx"
    assert SuccessRule("success").to_json() == {"token": "success"}
    assert SuccessRule.parse(SuccessRule("success").to_json()) == SuccessRule("success")


@pytest.mark.parametrize(
    "value",
    ["3xx", "", {"token": ""}, {"token": "   "}, {"token": 1}, {"token": "ok", "x": 1}, 200],
)
def test_a_bad_rule_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        SuccessRule.parse(value)

    assert str(caught.value).startswith("success: ")
    assert caught.value.field == "success"
