"""Fuzz the configuration readers: every ``SMSGW_*`` variable's parser with arbitrary text, the env-only endpoint
and the process settings with arbitrary environments, the fleet file (``parse_fleet``) with arbitrary documents
and ``load_fleet_file`` with arbitrary files. Nothing escapes but ``ConfigError``, in one line naming the variable,
or the file and the key."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.config import (
    ENDPOINT_KEYS,
    ENV_VARS,
    MODEM_KEYS,
    ConfigError,
    Settings,
    env_endpoint,
    load_fleet_file,
    parse_fleet,
)
from tests.fuzzing import FUZZ, numbers, one_line, texts

_NAMES = sorted(ENV_VARS)
_FILE_VARS = {name for name in _NAMES if name.endswith("_FILE")}

# Values that look like what each variable wants, then broken: URLs, ports, numbers, booleans, lists.
_near_misses = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1e400",
        "nan",
        "inf",
        "99999",
        "65536",
        "true",
        "yes",
        "http://[::1/s",
        "http://h:99999/s",
        "http://user:p@ss@h/s?secret=x",
        "https://",
        "amqp://g:g@h:5672/%2F,amqp://[::1",
        "amqp://,",
        "postgresql://u:p@[::1/db",
        "message=text,message=x",
        "from=a,to=b",
        "*100#",
        "0x10",
        "1_000",
    ]
)
env_values = _near_misses | texts | st.tuples(_near_misses, texts).map("".join)


def _names_the_variable(message: str, name: str) -> bool:
    return message.startswith(f"{name}:") and one_line(message)


# Secret files: missing, a directory, a name the OS refuses (NUL), a file that is not UTF-8, a good one.
_SECRETS = Path(tempfile.mkdtemp(prefix="smsgw-fuzz-"))
(_SECRETS / "good").write_text("s3cret\n", encoding="utf-8")
(_SECRETS / "latin1").write_bytes(b"caf\xe9\n")
_secret_paths = st.sampled_from(
    [str(_SECRETS / "good"), str(_SECRETS / "missing"), str(_SECRETS), "", "a\x00b", str(_SECRETS / "latin1")]
)


@FUZZ
@given(name=st.sampled_from(_NAMES), raw=env_values)
@example(name="SMSGW_SECRET_FILE", raw="a\x00b")  # was: ValueError "embedded null byte" from open()
@example(name="SMSGW_AMQP_PASSWORD_FILE", raw="a\x00b")
@example(name="SMSGW_SYNC_URL", raw="http://h:99999/s")
@example(name="SMSGW_SECRET_FILE", raw="\x1e")  # was: a message on two lines (the path printed as is)
def test_each_variable_parses_or_names_itself_in_one_line(name: str, raw: str) -> None:
    variable = ENV_VARS[name]
    try:
        variable.parse(name, raw)
        if name in _FILE_VARS and raw.strip():
            from services.config import read_secret_file

            read_secret_file(name, raw)
    except ConfigError as exc:
        assert _names_the_variable(str(exc), name), str(exc)


@FUZZ
@given(name=st.sampled_from(["SMSGW_SYNC_URL", "SMSGW_LEDGER_URL", "SMSGW_AMQP_URL"]), host=st.just("[::1"))
@example(name="SMSGW_SYNC_URL", host="[::1")
def test_an_unclosed_ipv6_url_is_a_config_error(name: str, host: str) -> None:
    """Issue 13: ``http://[::1/s`` ends in a traceback instead of one line naming the variable."""
    scheme = {"SMSGW_SYNC_URL": "http", "SMSGW_LEDGER_URL": "postgresql", "SMSGW_AMQP_URL": "amqp"}[name]
    with pytest.raises(ConfigError) as caught:
        ENV_VARS[name].parse(name, f"{scheme}://{host}/s")
    assert _names_the_variable(str(caught.value), name)


@FUZZ
@given(port=st.integers(65536, 10**6))
@example(port=99999)
def test_a_sync_url_port_out_of_range_is_a_config_error(port: int) -> None:
    """Issue 13: port 99999 passes ``config check``."""
    with pytest.raises(ConfigError):
        ENV_VARS["SMSGW_SYNC_URL"].parse("SMSGW_SYNC_URL", f"http://127.0.0.1:{port}/sms")


_some_env = st.dictionaries(st.sampled_from(_NAMES), env_values | _secret_paths, max_size=6)


@FUZZ
@given(environ=_some_env)
def test_an_environment_gives_settings_or_one_config_error(environ: dict[str, str]) -> None:
    for read in (Settings.from_env, env_endpoint):
        try:
            read(environ)
        except ConfigError as exc:
            message = str(exc)
            assert one_line(message) and message.split(":", maxsplit=1)[0] in ENV_VARS, message


# --- the fleet file ---------------------------------------------------------------------------------------------

_toml_scalars = (
    st.booleans()
    | numbers.filter(lambda n: not isinstance(n, int) or abs(n) < 2**63)
    | texts
    | st.datetimes()
    | st.dates()
    | st.times()
    | _near_misses
)


def _toml(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        _toml_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


_endpoint_keys = st.sampled_from(sorted(ENDPOINT_KEYS))
_endpoint_value = st.one_of(
    _toml(texts),
    _secret_paths,
    st.sampled_from(["default", "a", "parked", "A B", "http://127.0.0.1:1/s", "[", "(?P<x"]),
    st.lists(st.sampled_from(["a", "", "(", "*", "[::1"]), max_size=3),
)
endpoints = st.dictionaries(_endpoint_keys, _endpoint_value, max_size=8).map(lambda t: {"name": "e", **t} if t else t)
modems = st.dictionaries(
    st.sampled_from(["m1", "m 2", "", "x" * 65]) | texts,
    st.dictionaries(st.sampled_from(sorted(MODEM_KEYS)) | texts, _toml(texts), max_size=4) | _toml(texts),
    max_size=3,
)
routes = st.lists(
    st.dictionaries(
        st.sampled_from(["prefix", "modems", "x"]),
        st.sampled_from(["+255", "", "x"]) | st.lists(st.sampled_from(["m1", "m 2", ""]), max_size=2) | _toml(texts),
        max_size=3,
    )
    | _toml(texts),
    max_size=3,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "endpoints": st.lists(endpoints | _toml(texts), max_size=3) | _toml(texts),
        "modems": modems | _toml(texts),
        "routes": routes | _toml(texts),
    },
) | st.dictionaries(texts, _toml(texts), max_size=3)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _as_toml(document: dict[str, Any]) -> str:
    """A rough TOML rendering (strings and numbers only) so the file path reaches the validation."""
    lines: list[str] = []
    endpoints = document.get("endpoints")
    for endpoint in endpoints if isinstance(endpoints, list) else []:
        if isinstance(endpoint, dict):
            lines.append("[[endpoints]]")
            lines += [f"{key} = {_literal(value)}" for key, value in endpoint.items() if _literal(value)]
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) < 2**63:
        return str(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return ""


_SOURCE = "/etc/smsgw/fleet.toml"


@FUZZ
@given(document=documents, read_secrets=st.booleans())
@example(document={"endpoints": [{"name": "e", "secret_file": "a\x00b"}]}, read_secrets=True)
@example(document={"endpoints": [{"name": "e", "signing_key_file": str(_SECRETS)}]}, read_secrets=True)
@example(document={"endpoints": [{"name": "e", "task_interval": datetime.time(1, 2)}]}, read_secrets=True)
@example(document={"endpoints": [{"name": "e", "patterns": ["(?P<x"]}]}, read_secrets=True)
@example(document={"\x1e": []}, read_secrets=False)  # was: a message on two lines (the key printed as is)
def test_a_fleet_document_validates_or_names_file_and_key(document: dict[str, Any], read_secrets: bool) -> None:
    try:
        fleet = parse_fleet(document, _SOURCE, read_secrets=read_secrets)
    except ConfigError as exc:
        message = str(exc)
        assert one_line(message) and message.startswith(f"{_SOURCE}: "), message
        return
    assert fleet.endpoints


@FUZZ
@given(text=st.text(max_size=300) | documents.map(_as_toml))
@example(text='[[endpoints]]\nname = "e"\nsync_url = "http://127.0.0.1:1/s"\n')
def test_a_fleet_file_loads_or_names_itself_in_one_line(text: str) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as file:
        file.write(text.encode("utf-8", "surrogatepass"))
    try:
        load_fleet_file(file.name, read_secrets=False)
    except ConfigError as exc:
        assert one_line(str(exc)) and str(exc).startswith(f"{file.name}: "), str(exc)
    finally:
        Path(file.name).unlink()


@FUZZ
@given(raw=st.binary(min_size=1, max_size=40).filter(lambda raw: not _is_utf8(raw)))
@example(raw=b'[[endpoints]]\nname = "\xff"\n')
def test_a_fleet_file_that_is_not_utf8_is_a_config_error(raw: bytes) -> None:
    """Issue 13: a non-UTF-8 TOML file ends in a traceback instead of one line and exit 2."""
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as file:
        file.write(raw)
    try:
        with pytest.raises(ConfigError):
            load_fleet_file(file.name, read_secrets=False)
    finally:
        Path(file.name).unlink()
