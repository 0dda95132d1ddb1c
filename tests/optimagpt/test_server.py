import pytest
from twisted.web.http import _parseContentType

from optimagpt.server import _media_type


@pytest.mark.parametrize("header", [
    b"application/json", b"Application/JSON; charset=utf-8", b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded", b" application/x-www-form-urlencoded ", b"garbage", b"", b"text/",
    b"a/b/c", b"text/plain;charset=latin-1",
])
def test_the_fast_media_type_parser_agrees_with_twisteds(header: bytes) -> None:
    assert _media_type(header) == _parseContentType(header)
