import pytest

from hotswap.hub import InvalidName, Ref, parse_ref


@pytest.mark.parametrize("text,expected", [
    ("sql", Ref("sql", alias="latest")),
    ("sql@3", Ref("sql", version=3)),
    ("sql@prod", Ref("sql", alias="prod")),
    ("my-adapter_v2.1@staging", Ref("my-adapter_v2.1", alias="staging")),
])
def test_parse_valid(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text.replace("@latest", "")


@pytest.mark.parametrize("text,fragment", [
    ("../x", "not an identifier"), ("/etc/passwd", "not an identifier"), ("a/b", "not an identifier"),
    ("Sql", "not an identifier"), ("", "non-empty"), ("sql@", "empty version"), ("sql@0", "versions run from 1"), ("sql@99999999999999999999", "versions run from 1"),
    ("x" * 65, "longer than 64"), ("a..b", "not an identifier"), ("sql@Prod", "not an identifier"),
    ("sql@³", "not an identifier"), ("sql@١٢", "not an identifier"),  # other scripts' digits: versions are 0-9
])
def test_parse_refuses(text, fragment):
    with pytest.raises(InvalidName, match=fragment):
        parse_ref(text)
