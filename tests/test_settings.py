"""Settings: precedence, validation messages, provenance, and docs that cannot drift.

The reference table in docs/configuration.md is generated from the Settings model by
this module; when a setting changes, regenerate it with::

    .venv/bin/python -m tests.test_settings docs

and ``.venv/bin/python -m tests.test_settings example`` prints a skeleton of
sijnode.example.toml to compare with (that file is kept by hand).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from sijnode.errors import ConfigurationError
from sijnode.settings import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    MASK,
    Settings,
    env_var_name,
    flatten,
    is_secret,
    key_for_env_var,
    load_settings,
    mask_url,
    masked_values,
    settings_provenance,
    unknown_env_vars,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "sijnode.example.toml"
DOCS = ROOT / "docs" / "configuration.md"
TABLE_START = "<!-- settings-table:start (generated: python -m tests.test_settings docs) -->"
TABLE_END = "<!-- settings-table:end -->"
SIJNODE = Path(sys.executable).with_name("sijnode")


# --------------------------------------------------------------------------------------
# The model as a list of documented keys
# --------------------------------------------------------------------------------------


def _model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _table_list_item(annotation: Any) -> type[BaseModel] | None:
    """``list[Model]`` (an array of tables) -> Model."""
    if get_origin(annotation) is list:
        return _model(get_args(annotation)[0])
    return None


def _table_dict_item(annotation: Any) -> type[BaseModel] | None:
    """``dict[str, Model]`` (tables keyed by name) -> Model."""
    if get_origin(annotation) is dict:
        return _model(get_args(annotation)[1])
    return None


def generic_key(key: str) -> str:
    """``routes.0.name`` -> ``routes[].name``; ``pipelines.ct.device`` ->
    ``pipelines.<name>.device``: the form the docs use for one row per setting."""
    model: type[BaseModel] | None = Settings
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if model is None or parts[i] not in model.model_fields:
            raise KeyError(f"{key!r} names no setting (at {parts[i]!r})")
        annotation = model.model_fields[parts[i]].annotation
        out.append(parts[i])
        i += 1
        if (item := _table_list_item(annotation)) is not None and i < len(parts):
            out[-1] += "[]"
            i += 1  # the index
            model = item
        elif (item := _table_dict_item(annotation)) is not None and i < len(parts):
            out.append("<name>")
            i += 1  # the table's name
            model = item
        else:
            model = _model(annotation)
    return ".".join(out)


@dataclass(frozen=True)
class KeyDoc:
    """One row of the reference table."""

    key: str
    env: str
    type: str
    default: str
    description: str
    container: bool = False  # a list of tables or tables keyed by name


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _type_text(annotation: Any, field: FieldInfo) -> str:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        inner = " or ".join(_type_text(a, field) for a in args)
        return f"{inner}, or unset"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list of {_type_text(get_args(annotation)[0], FieldInfo())}s"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {getattr(item, attr)}")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
        value = {k: v.model_dump(mode="json", exclude_defaults=True) for k, v in value.items()}
    if value is None:
        return "unset"
    return f"`{json.dumps(to_jsonable_python(value), ensure_ascii=False)}`"


def key_docs(
    model: type[BaseModel] = Settings,
    prefix: str = "",
    env: str = ENV_PREFIX,
    within: str | None = None,
) -> Iterator[KeyDoc]:
    """Every setting: one row per leaf and one per list of tables or table of tables.

    ``env`` is the variable prefix at this level; ``within`` is the variable of the array
    of tables this level is in (such keys are set as part of that variable's JSON list).
    """
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        env_name = f"{env}{name.upper()}"
        if (section := _model(annotation)) is not None:
            yield from key_docs(section, f"{key}.", f"{env_name}{ENV_NESTED_DELIMITER}", within)
            continue
        list_item = _table_list_item(annotation)
        dict_item = _table_dict_item(annotation)
        if list_item is not None or dict_item is not None:
            item = list_item or dict_item
            assert item is not None
            assert within is None, "tables inside an array of tables are not documented"
            if list_item is not None:
                kind = f"array of tables `[[{key}]]`"
                about = "Replaced whole by the source that sets it."
            else:
                names = ", ".join(f"`{n}`" for n in field.get_default(call_default_factory=True))
                kind = f"tables `[{key}.<name>]`"
                about = f"Keyed by name; {names} always exist."
            yield KeyDoc(
                key=key,
                env=f"`{env_name}` (JSON)",
                type=kind,
                default=_default_text(field),
                description=f"{field.description or _first_line(item.__doc__)} {about}",
                container=True,
            )
            if list_item is not None:
                yield from key_docs(list_item, f"{key}[].", f"{env_name}__", env_name)
            else:
                yield from key_docs(
                    item, f"{key}.<name>.", f"{env_name}{ENV_NESTED_DELIMITER}<NAME>__"
                )
            continue
        yield KeyDoc(
            key=key,
            env=f"in `{within}` (JSON)" if within else f"`{env_name}`",
            type=_type_text(annotation, field),
            default=_default_text(field),
            description=field.description or "",
        )


def render_docs_table() -> str:
    """The reference section of docs/configuration.md, one table per top-level section."""
    lines = [TABLE_START, ""]
    groups: dict[str, list[KeyDoc]] = {}
    for doc in key_docs():
        section = doc.key.split(".")[0].split("[")[0]
        groups.setdefault(section if section != doc.key or doc.container else "", []).append(doc)
    for section, docs in groups.items():
        if section:
            field = Settings.model_fields[section]
            about = _first_line((_model(field.annotation) or type(None)).__doc__)
            lines += [f"### `{section}`", ""]
            if about and _model(field.annotation) is not None:
                lines += [about, ""]
        else:
            lines += ["### Top level", ""]
        lines += [
            "| Key | Environment variable | Type | Default | Description |",
            "| --- | --- | --- | --- | --- |",
        ]
        for d in docs:
            cells = [f"`{d.key}`", d.env, d.type, d.default, d.description]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines.append(TABLE_END)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The example file: skeleton generator and the parser of its commented-out keys
# --------------------------------------------------------------------------------------

#: Values shown (commented out) for settings that are unset or required by default.
EXAMPLE_VALUES: dict[str, Any] = {
    "node.tls.cert_file": "/etc/sijnode/tls/node.crt",
    "node.tls.key_file": "/etc/sijnode/tls/node.key",
    "node.tls.ca_file": "/etc/sijnode/tls/ca.crt",
    "pipelines.<name>.model": "/models/{name}.safetensors",
    "pipelines.<name>.localizer": "/models/si-joint-localizer.safetensors",
    "pipelines.<name>.threshold": 0.5,
    "destinations[].name": "pacs",
    "destinations[].ae_title": "PACS",
    "destinations[].host": "pacs.example.org",
    "destinations[].tls.cert_file": "/etc/sijnode/tls/node.crt",
    "destinations[].tls.key_file": "/etc/sijnode/tls/node.key",
    "destinations[].tls.ca_file": "/etc/sijnode/tls/ca.crt",
}


def _toml_value(value: Any) -> str:
    value = to_jsonable_python(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def render_example_skeleton() -> str:
    """sijnode.example.toml as generated from the model (the file itself is hand-kept)."""
    out: list[str] = []
    seen: set[str] = set()

    def table(
        model: type[BaseModel],
        values: dict[str, Any] | None,
        path: str,
        generic: str,
        header: str | None,
        commented: bool,
        name: str = "",
    ) -> None:
        c = "# " if commented else ""
        if header is not None:
            about = _first_line(model.__doc__)
            out.append("")
            if about and generic not in seen:
                out.append(f"# {about}")
            out.append(f"{c}{header}")
            seen.add(generic)
        later: list[tuple[str, str, FieldInfo]] = []
        for field_name, field in model.model_fields.items():
            key = f"{generic}.{field_name}" if generic else field_name
            annotation = field.annotation
            if _model(annotation) or _table_list_item(annotation) or _table_dict_item(annotation):
                later.append((field_name, key, field))
                continue
            if values is not None:
                value = values.get(field_name)
            else:
                value = None if field.is_required() else field.get_default(validated_data={})
            off = commented or value is None
            if value is None:
                value = EXAMPLE_VALUES[key]
                if isinstance(value, str):
                    value = value.format(name=name)
            if key not in seen:
                note = " Unset by default." if not commented and off else ""
                out.append(f"# {field.description}{note}")
                seen.add(key)
            out.append(f"{'# ' if off else ''}{field_name} = {_toml_value(value)}")
        for field_name, key, field in later:
            annotation = field.annotation
            sub = values.get(field_name) if values is not None else None
            full = f"{path}.{field_name}" if path else field_name
            if (section := _model(annotation)) is not None:
                table(section, sub, full, key, f"[{full}]", commented, name)
            elif (item := _table_list_item(annotation)) is not None:
                items = sub or []
                if items:
                    for entry in items:
                        table(item, entry, full, f"{key}[]", f"[[{full}]]", commented, name)
                else:
                    out.append("")
                    out.append(f"# None by default; add one [[{full}]] table per entry.")
                    table(item, None, full, f"{key}[]", f"[[{full}]]", True, name)
            elif (item := _table_dict_item(annotation)) is not None:
                for entry_name, entry in (sub or {}).items():
                    table(
                        item,
                        entry,
                        f"{full}.{entry_name}",
                        f"{key}.<name>",
                        f"[{full}.{entry_name}]",
                        commented,
                        entry_name,
                    )

    out += [
        "# sijnode settings: every key with its default value (docs/configuration.md).",
        "# Precedence: command line > SIJNODE_* environment > this file (--config) > defaults.",
        "# Keys that are unset by default are commented out with an example value.",
    ]
    table(Settings, Settings().model_dump(mode="json"), "", "", None, False)
    return "\n".join(out).strip() + "\n"


_COMMENTED_SETTING = re.compile(r"^# ((?:\[\[?[a-z0-9_.]+\]\]?)|(?:[a-z_][a-z0-9_]* = .*))$")


def uncomment_example(text: str) -> str:
    """The example with its commented-out settings and table headers switched on."""
    return "\n".join(
        m.group(1) if (m := _COMMENTED_SETTING.match(line)) else line for line in text.splitlines()
    )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_sijnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``sijnode`` entry point, so exit codes and stderr are real."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")}
    return subprocess.run(
        [str(SIJNODE), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------------------
# Defaults and precedence
# --------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s.node.ae_title == "SIJNODE"
    assert s.node.port == 11112
    assert s.node.bind_address == "0.0.0.0"
    assert s.node.tls.enabled is False
    assert s.node.allowed_addresses == []
    assert s.broker.url == ""  # embedded mode
    assert s.database.url.startswith("sqlite:///")
    assert s.storage.spool_dir == Path("var/spool")
    assert [(r.name, r.pipeline, r.modality) for r in s.routes] == [
        ("ct-pelvis", "ct", "CT"),
        ("mr-sij", "mr", "MR"),
    ]
    assert sorted(s.pipelines) == ["ct", "mr"]
    assert s.pipelines["ct"].model is None
    assert s.pipelines["mr"].localizer is None
    assert s.destinations == []
    assert s.metrics.port == 9108
    assert s.delivery.max_attempts == 5
    assert s.logging.level == "INFO"


def test_file_values(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "s.toml",
        """
data_dir = "/srv/sijnode"
[node]
ae_title = "FILEAE"
port = 11113
allowed_addresses = ["10.0.0.0/8"]
[broker]
url = "redis://redis:6379/0"
[pipelines.ct]
model = "/models/ct.safetensors"
threshold = 0.42
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.local"
""",
    )
    s = load_settings(cfg)
    assert s.data_dir == Path("/srv/sijnode")
    assert (s.node.ae_title, s.node.port) == ("FILEAE", 11113)
    assert s.node.allowed_addresses == ["10.0.0.0/8"]
    assert s.node.max_associations == 64  # untouched keys of a section keep their default
    assert s.broker.url == "redis://redis:6379/0"
    assert s.pipelines["ct"].model == "/models/ct.safetensors"
    assert s.pipelines["ct"].threshold == 0.42
    assert s.pipelines["mr"].model is None  # the other pipeline is kept
    assert [(d.name, d.port) for d in s.destinations] == [("pacs", 104)]


def test_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "s.toml", '[node]\nae_title = "FILEAE"\nport = 11113\n')
    monkeypatch.setenv("SIJNODE_NODE__PORT", "11114")
    s = load_settings(cfg)
    assert s.node.port == 11114
    assert s.node.ae_title == "FILEAE"  # env and file merge key by key


def test_command_line_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "s.toml", '[node]\nae_title = "FILEAE"\nport = 11113\n')
    monkeypatch.setenv("SIJNODE_NODE__PORT", "11114")
    monkeypatch.setenv("SIJNODE_NODE__AE_TITLE", "ENVAE")
    s = load_settings(cfg, {"node": {"port": 11115}})
    assert s.node.port == 11115
    assert s.node.ae_title == "ENVAE"


def test_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_NODE__TLS__ENABLED", "true")
    monkeypatch.setenv("SIJNODE_NODE__TLS__CERT_FILE", "/tls/node.crt")
    monkeypatch.setenv("SIJNODE_NODE__TLS__KEY_FILE", "/tls/node.key")
    monkeypatch.setenv("SIJNODE_PIPELINES__MR__GRADCAM__ALPHA", "0.25")
    monkeypatch.setenv("sijnode_metrics__port", "0")  # names are case-insensitive
    s = load_settings()
    assert s.node.tls.enabled is True
    assert s.node.tls.cert_file == Path("/tls/node.crt")
    assert s.pipelines["mr"].gradcam.alpha == 0.25
    assert s.pipelines["ct"].gradcam.alpha == 0.4
    assert s.metrics.port == 0


def test_one_pipeline_in_environment_keeps_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_PIPELINES__CT__MODEL", "/models/ct.safetensors")
    s = load_settings()  # the default route mr-sij still finds its pipeline
    assert s.pipelines["ct"].model == "/models/ct.safetensors"
    assert s.pipelines["mr"].model is None


def test_renamed_checkpoint_key_is_refused_with_its_new_name(tmp_path: Path) -> None:
    cfg = write(tmp_path / "s.toml", '[pipelines.ct]\ncheckpoint = "/models/ct.pt"\n')
    with pytest.raises(ConfigurationError, match=r"pipelines.ct.*checkpoint was renamed"):
        load_settings(cfg)


def test_list_environment_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_NODE__ALLOWED_ADDRESSES", '["10.0.0.0/8", "192.168.1.5"]')
    monkeypatch.setenv("SIJNODE_NODE__ALLOWED_CALLING_AE_TITLES", '["CT1", "MR1"]')
    monkeypatch.setenv(
        "SIJNODE_ROUTES", '[{"name": "ct-only", "pipeline": "ct", "modality": "CT"}]'
    )
    monkeypatch.setenv(
        "SIJNODE_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "pacs"}]'
    )
    s = load_settings()
    assert s.node.allowed_addresses == ["10.0.0.0/8", "192.168.1.5"]
    assert s.node.allowed_calling_ae_titles == ["CT1", "MR1"]
    assert [r.name for r in s.routes] == ["ct-only"]
    assert [(d.name, d.host, d.port) for d in s.destinations] == [("pacs", "pacs", 104)]


def test_list_environment_that_is_not_json_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIJNODE_NODE__ALLOWED_ADDRESSES", "10.0.0.0/8")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "SIJNODE_NODE__ALLOWED_ADDRESSES" in message
    assert "'10.0.0.0/8'" in message
    assert "expected JSON" in message


# --------------------------------------------------------------------------------------
# Validation messages: the key, the value, what was expected, and where it came from
# --------------------------------------------------------------------------------------

INVALID = [
    pytest.param(
        '[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n',
        ["node.ae_title", "'ABCDEFGHIJKLMNOPQ'", "1 to 16", "17 characters"],
        id="ae-title-too-long",
    ),
    pytest.param(
        '[node]\nae_title = "A\\\\B"\n',
        ["node.ae_title", "without backslash"],
        id="ae-title-backslash",
    ),
    pytest.param(
        "[node]\nport = 0\n", ["node.port", "= 0", "greater than or equal to 1"], id="port-0"
    ),
    pytest.param(
        "[node]\nport = 70000\n",
        ["node.port", "= 70000", "less than or equal to 65535"],
        id="port-70000",
    ),
    pytest.param(
        '[node]\nallowed_addresses = ["10.0.0.0/33"]\n',
        ["node.allowed_addresses", "'10.0.0.0/33'", "expected an IP address or CIDR network"],
        id="bad-cidr",
    ),
    pytest.param(
        '[node]\nbind_address = "localhost"\n',
        ["node.bind_address", "'localhost'", "expected an IP address"],
        id="bind-address-not-ip",
    ),
    pytest.param(
        '[[routes]]\nname = "spine"\npipeline = "spine"\nmodality = "CT"\n',
        ["routes.0.pipeline", "'spine'", "expected one of ['ct', 'mr']"],
        id="route-unknown-pipeline",
    ),
    pytest.param(
        '[[routes]]\nname = "r"\npipeline = "ct"\nmodality = "CT"\nseries_description = "(ax"\n',
        ["routes.0.series_description", "'(ax'", "expected a regular expression"],
        id="bad-regex",
    ),
    pytest.param(
        "[node.tls]\nenabled = true\n",
        ["node.tls", "expected cert_file and key_file", "missing cert_file, key_file"],
        id="tls-without-cert-files",
    ),
    pytest.param(
        '[node.tls]\nenabled = true\ncert_file = "/c.pem"\n',
        ["node.tls", "missing key_file"],
        id="tls-without-key-file",
    ),
    pytest.param(
        '[node.tls]\nrequire_client_cert = true\ncert_file = "/c.pem"\nkey_file = "/k.pem"\n',
        ["node.tls", "expected ca_file"],
        id="mutual-tls-without-ca",
    ),
    pytest.param("[node]\nbogus = 1\n", ["node.bogus", "= 1", "expected a known key"], id="extra"),
    pytest.param('bogus = "x"\n', ["bogus", "'x'", "expected a known key"], id="extra-top"),
    pytest.param(
        '[logging]\nlevel = "LOUD"\n', ["logging.level", "'LOUD'", "'DEBUG'"], id="log-level"
    ),
    pytest.param(
        '[node]\nuid_root = "1.2.3"\n',
        ["node.uid_root", "'1.2.3'", "ends with '.'"],
        id="uid-root-without-dot",
    ),
    pytest.param(
        '[[destinations]]\nname = "p"\nae_title = "A_VERY_LONG_AE_TITLE"\nhost = "h"\n',
        ["destinations.0.ae_title", "'A_VERY_LONG_AE_TITLE'", "1 to 16"],
        id="destination-ae-title",
    ),
    pytest.param(
        '[[destinations]]\nname = "p"\nae_title = "PACS"\n',
        ["destinations.0.host", "Field required"],
        id="destination-without-host",
    ),
]


@pytest.mark.parametrize(("toml", "expected"), INVALID)
def test_invalid_file_values_are_named(tmp_path: Path, toml: str, expected: list[str]) -> None:
    cfg = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert f"(file {cfg})" in message or "routes.0.pipeline" in message


def test_error_names_the_environment_variable_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "ok.toml", "[node]\nport = 11113\n")
    monkeypatch.setenv("SIJNODE_NODE__PORT", "0")
    with pytest.raises(ConfigurationError) as info:
        load_settings(cfg)
    assert (
        "node.port = '0' (environment SIJNODE_NODE__PORT): "
        "Input should be greater than or equal to 1" in str(info.value)
    )


def test_error_names_the_command_line_source() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(None, {"node": {"port": 70000}})
    assert "node.port = 70000 (command line)" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigurationError, match="does not exist") as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "broken.toml", "[node\nport = \n")
    with pytest.raises(ConfigurationError, match="is not valid TOML") as info:
        load_settings(cfg)
    assert str(cfg) in str(info.value)


# --------------------------------------------------------------------------------------
# Environment variable names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("SIJNODE_NODE__AE_TITLE", "node.ae_title"),
        ("SIJNODE_NODE__TLS__ENABLED", "node.tls.enabled"),
        ("sijnode_node__port", "node.port"),
        ("SIJNODE_PIPELINES__CT__GRADCAM__ALPHA", "pipelines.ct.gradcam.alpha"),
        ("SIJNODE_ROUTES", "routes"),
        ("SIJNODE_DATA_DIR", "data_dir"),
        ("SIJNODE_DATABSE__URL", None),
        ("SIJNODE_NODE__PROT", None),
        ("SIJNODE_ROUTES__0__NAME", None),
        ("OTHER_NODE__PORT", None),
    ],
)
def test_key_for_env_var(name: str, key: str | None) -> None:
    assert key_for_env_var(name) == key
    if key is not None:
        assert env_var_name(key) == name.upper()


def test_unknown_env_vars() -> None:
    env = {
        "SIJNODE_NODE__PORT": "1",
        "SIJNODE_DATABSE__URL": "x",
        "SIJNODE_CONFIG": "/etc/sijnode.toml",
        "SIJNODE_TEST_PG_URL": "x",
        "PATH": "/bin",
    }
    assert unknown_env_vars(env) == ["SIJNODE_DATABSE__URL"]


def test_every_documented_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting each leaf's variable (as the docs name it) changes exactly that setting."""
    defaults = flatten(Settings().model_dump(mode="json"))
    for key, value in defaults.items():
        if "routes." in key or isinstance(value, list):
            continue
        assert key_for_env_var(env_var_name(key)) == key
    monkeypatch.setenv("SIJNODE_STORAGE__MIN_FREE_MB", "7")
    monkeypatch.setenv("SIJNODE_DELIVERY__SHADOW_MODE", "true")
    s = flatten(load_settings().model_dump(mode="json"))
    changed = {k for k in defaults if s[k] != defaults[k]}
    assert changed == {"storage.min_free_mb", "delivery.shadow_mode"}


# --------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------


def test_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path / "s.toml",
        """
[node]
ae_title = "FILEAE"
port = 11113
site = "file-site"
[[routes]]
name = "only"
pipeline = "ct"
modality = "CT"
[pipelines.ct]
device = "cpu"
""",
    )
    monkeypatch.setenv("SIJNODE_NODE__PORT", "11114")
    monkeypatch.setenv("SIJNODE_NODE__TLS__ENABLED", "false")
    monkeypatch.setenv("SIJNODE_PIPELINES__MR__BATCH_SIZE", "4")
    settings, origins = settings_provenance(cfg, {"node": {"site": "cli-site"}})
    assert settings.node.site == "cli-site"
    file = f"file {cfg}"
    assert origins["node.site"] == "command line"
    assert origins["node.port"] == "environment"
    assert origins["node.ae_title"] == file
    assert origins["node.tls.enabled"] == "environment"
    assert origins["node.tls.cert_file"] == "default"
    assert origins["node.bind_address"] == "default"
    assert origins["routes.0.name"] == file
    assert origins["routes.0.body_part"] == file  # the list is replaced whole by the file
    assert "routes.1.name" not in origins
    assert origins["pipelines.ct.device"] == file
    assert origins["pipelines.ct.batch_size"] == "default"
    assert origins["pipelines.mr.batch_size"] == "environment"
    assert origins["pipelines.mr.device"] == "default"
    assert origins["broker.url"] == "default"
    assert origins["destinations"] == "default"
    assert set(origins) == set(flatten(settings.model_dump(mode="json")))


def test_provenance_of_json_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_NODE", '{"port": 11119}')
    monkeypatch.setenv("SIJNODE_ROUTES", '[{"name": "a", "pipeline": "mr", "modality": "MR"}]')
    settings, origins = settings_provenance()
    assert settings.node.port == 11119
    assert origins["node.port"] == "environment"
    assert origins["node.ae_title"] == "default"  # only port was in the JSON table
    assert origins["routes.0.modality"] == "environment"


# --------------------------------------------------------------------------------------
# `sijnode config show` and `sijnode config check`, as a user runs them
# --------------------------------------------------------------------------------------


def test_config_show_reports_sources(tmp_path: Path) -> None:
    cfg = write(tmp_path / "s.toml", '[node]\nae_title = "FILEAE"\nport = 11113\n')
    result = run_sijnode(
        "--config", str(cfg), "config", "show", "--format", "json", env={"SIJNODE_NODE__PORT": "1"}
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["node.ae_title"] == {"value": "FILEAE", "source": f"file {cfg}"}
    assert shown["node.port"] == {"value": 1, "source": "environment"}
    assert shown["node.bind_address"] == {"value": "0.0.0.0", "source": "default"}
    assert set(shown) == set(flatten(Settings().model_dump(mode="json")))


def test_config_show_table_and_config_envvar(tmp_path: Path) -> None:
    cfg = write(tmp_path / "s.toml", '[broker]\nurl = "redis://redis:6379/0"\n')
    result = run_sijnode("config", "show", env={"SIJNODE_CONFIG": str(cfg)})
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("broker.url "))
    assert '"redis://redis:6379/0"' in line
    assert line.endswith(f"[file {cfg}]")
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("node.port "))
    assert line.split()[1:] == ["11112", "[default]"]


def test_config_show_rejects_unknown_format() -> None:
    result = run_sijnode("config", "show", "--format", "xml")
    assert result.returncode == 2
    assert "xml" in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://sij:pa%40ss:w0rd@db:5432/sij",
            "postgresql+psycopg://sij:***@db:5432/sij",
        ),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        (
            "postgresql+psycopg://sij@db/sij?password=x&sslmode=require",
            "postgresql+psycopg://sij@db/sij?password=***&sslmode=require",
        ),
        ("https://user:token@pacs.example/dicom-web", "https://user:***@pacs.example/dicom-web"),
        ("postgresql+psycopg://sij@db/sij", "postgresql+psycopg://sij@db/sij"),
        ("sqlite:///var/sijnode.db", "sqlite:///var/sijnode.db"),
        ("not a url: a:b@c", "not a url: a:b@c"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def _every_field(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, field
        item = _model(field.annotation) or _table_list_item(field.annotation)
        item = item or _table_dict_item(field.annotation)
        if item is not None:
            yield from _every_field(item, f"{key}.")


def test_every_secret_looking_setting_is_marked_secret() -> None:
    """A new password, passphrase or token setting must be masked by ``config show``: mark
    it ``json_schema_extra={"secret": True}`` or type it ``SecretStr``."""
    looks_secret = re.compile(r"secret|password|passphrase|token|api_key|credential", re.I)
    fields = dict(_every_field())
    assert is_secret(fields["database.pseudonym_secret"])
    for key, field in fields.items():
        if looks_secret.search(key.rsplit(".", 1)[-1]):
            assert is_secret(field), f"{key} looks like a secret but is not marked secret"
    assert not is_secret(fields["node.tls.key_file"])  # a path, not a secret

    class WithSecret(BaseModel):
        passphrase: SecretStr | None = None
        plain: str = ""

    assert is_secret(WithSecret.model_fields["passphrase"])
    assert not is_secret(WithSecret.model_fields["plain"])


def test_masked_values() -> None:
    settings = load_settings(
        None,
        {
            "database": {
                "url": "postgresql+psycopg://sij:s3cret-pw@db:5432/sij",
                "pseudonym_secret": "site-hmac-key",
            },
            "broker": {"url": "redis://:redis-pw@redis:6379/0"},
        },
    )
    values, masked = masked_values(settings)
    assert masked == {"database.url", "database.pseudonym_secret", "broker.url"}
    assert values["database.url"] == "postgresql+psycopg://sij:***@db:5432/sij"
    assert values["database.pseudonym_secret"] == MASK
    assert values["broker.url"] == "redis://:***@redis:6379/0"
    unmasked = flatten(settings.model_dump(mode="json"))
    assert set(values) == set(unmasked)
    assert {k: v for k, v in values.items() if k not in masked} == {
        k: v for k, v in unmasked.items() if k not in masked
    }
    assert settings.database.pseudonym_secret == "site-hmac-key"  # the values in use stay


def test_config_show_masks_secrets() -> None:
    env = {
        "SIJNODE_DATABASE__URL": "postgresql+psycopg://sij:s3cret-pw@db:5432/sij",
        "SIJNODE_DATABASE__PSEUDONYM_SECRET": "site-hmac-key",
        "SIJNODE_BROKER__URL": "redis://:redis-pw@redis:6379/0",
    }
    table = run_sijnode("config", "show", env=env)
    shown = run_sijnode("config", "show", "--format", "json", env=env)
    for result in (table, shown):
        assert result.returncode == 0, result.stderr
        for secret in ("s3cret-pw", "site-hmac-key", "redis-pw"):
            assert secret not in result.stdout + result.stderr
    lines = {ln.split()[0]: ln for ln in table.stdout.splitlines() if ln.strip()}
    assert '"postgresql+psycopg://sij:***@db:5432/sij"' in lines["database.url"]
    assert lines["database.pseudonym_secret"].split()[1:] == ['"***"', "[environment,", "masked]"]
    assert lines["node.port"].split()[1:] == ["11112", "[default]"]
    assert table.stdout.rstrip().splitlines()[-1].startswith("Secrets are shown as ***")
    data = json.loads(shown.stdout)
    assert data["database.pseudonym_secret"] == {
        "value": "***",
        "source": "environment",
        "masked": True,
    }
    assert data["broker.url"]["value"] == "redis://:***@redis:6379/0"
    assert "masked" not in data["node.port"]


def test_config_check_valid(tmp_path: Path) -> None:
    cfg = write(tmp_path / "s.toml", '[node]\nae_title = "OK"\n')
    result = run_sijnode("config", "check", str(cfg))
    assert result.returncode == 0, result.stderr
    assert f"ok: {cfg} is valid" in result.stdout
    assert result.stderr == ""
    result = run_sijnode("--config", str(cfg), "config", "check")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("[node]\nport = 70000\n", {}, "node.port = 70000"),
        ("[node\n", {}, "is not valid TOML"),
        (None, {}, "does not exist"),
        ("", {"SIJNODE_NODE__AE_TITLE": "X" * 17}, "node.ae_title = 'XXXXXXXXXXXXXXXXX'"),
        ("", {"SIJNODE_NODE__PROT": "1"}, "node.prot = '1' (environment SIJNODE_NODE__PROT)"),
        ("", {"SIJNODE_DATABSE__URL": "x"}, "SIJNODE_DATABSE__URL (environment)"),
    ],
    ids=["invalid-value", "invalid-toml", "missing-file", "invalid-env", "extra-env", "typo-env"],
)
def test_config_check_invalid(
    tmp_path: Path, toml: str | None, env: dict[str, str], expected: str
) -> None:
    cfg = tmp_path / "s.toml"
    if toml is not None:
        write(cfg, toml)
    result = run_sijnode("config", "check", str(cfg), env=env)
    assert result.returncode == 1
    assert expected in result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------
# sijnode.example.toml and docs/configuration.md cover every setting
# --------------------------------------------------------------------------------------


def _all_generic_keys() -> set[str]:
    return {d.key for d in key_docs()}


def _leaf_generic_keys() -> set[str]:
    """Every leaf of the model, plus the leaves of the default settings' values."""
    containers = {d.key for d in key_docs() if d.container}
    leaves = {k for k in _all_generic_keys() if k not in containers}
    defaults = {generic_key(k) for k in flatten(Settings().model_dump(mode="json"))}
    return leaves | (defaults - containers)


def test_generic_keys() -> None:
    assert generic_key("routes.1.series_description") == "routes[].series_description"
    assert generic_key("pipelines.mr.gradcam.alpha") == "pipelines.<name>.gradcam.alpha"
    assert generic_key("destinations") == "destinations"
    assert generic_key("node.tls.enabled") == "node.tls.enabled"
    with pytest.raises(KeyError):
        generic_key("node.nope")


def test_example_file_is_the_defaults() -> None:
    assert load_settings(EXAMPLE).model_dump() == Settings().model_dump()


def test_example_file_covers_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    active = flatten(tomllib.loads(text))
    everything = flatten(tomllib.loads(uncomment_example(text)))
    # every leaf of the defaults, literally (routes.1.orientation, pipelines.mr.device, ...)
    defaults = flatten(Settings().model_dump(mode="json"))
    missing = [
        k
        for k in defaults
        if k not in everything and not any(e.startswith(f"{k}.") for e in everything)
    ]
    assert not missing, f"sijnode.example.toml lacks {missing}"
    # every field of the model, including those of tables that are empty by default
    covered = {generic_key(k) for k in everything}
    assert _leaf_generic_keys() - covered == set()
    # active keys hold the defaults; commented-out keys are those unset by default
    for key, value in active.items():
        assert defaults[key] == value, key
    for key in set(everything) - set(active):
        assert key not in defaults or defaults[key] is None, f"{key} is commented out"


def test_example_file_with_everything_switched_on_is_valid(tmp_path: Path) -> None:
    on = write(tmp_path / "on.toml", uncomment_example(EXAMPLE.read_text(encoding="utf-8")))
    s = load_settings(on)
    assert s.node.tls.cert_file is not None
    assert len(s.destinations) == 1


def test_example_file_comments_every_key() -> None:
    """The first line of each setting (active or commented out) follows a comment line."""
    seen: set[str] = set()
    section = ""
    index: dict[str, int] = {}
    previous = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        body = m.group(1) if (m := _COMMENTED_SETTING.match(line)) else line
        if header := re.match(r"^\[\[([a-z0-9_.]+)\]\]$", body):
            index[header.group(1)] = index.get(header.group(1), -1) + 1
            section = f"{header.group(1)}.{index[header.group(1)]}."
        elif header := re.match(r"^\[([a-z0-9_.]+)\]$", body):
            # [destinations.tls] is the tls table of the last [[destinations]]
            parts = header.group(1).split(".")
            section = "".join(
                f"{p}.{index[p]}." if p in index and i == 0 else f"{p}."
                for i, p in enumerate(parts)
            )
        elif setting := re.match(r"^([a-z_][a-z0-9_]*) = ", body):
            key = generic_key(section + setting.group(1))
            if key not in seen:
                assert previous.startswith("# ") and not _COMMENTED_SETTING.match(previous), (
                    f"{key} has no comment line above it"
                )
                assert len(previous) > len("# ") + 3, f"{key}: empty comment"
                seen.add(key)
        previous = line
    assert seen >= _leaf_generic_keys()


def test_docs_table_is_up_to_date() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, "docs/configuration.md lost its markers"
    current = text[text.index(TABLE_START) : text.index(TABLE_END) + len(TABLE_END)]
    assert current == render_docs_table(), (
        "docs/configuration.md is out of date: run `.venv/bin/python -m tests.test_settings docs`"
    )


def test_docs_list_every_key_with_default_and_description() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = {
        m.group(1): line for line in text.splitlines() if (m := re.match(r"^\| `([^`]+)` \|", line))
    }
    defaults = flatten(Settings().model_dump(mode="json"))
    for key in _leaf_generic_keys() | _all_generic_keys():
        assert key in rows, f"docs/configuration.md has no row for {key}"
        cells = [c.strip() for c in rows[key].strip("|").split(" | ")]
        assert cells[3], f"{key}: no default"
        assert cells[4], f"{key}: no description"
    for key, value in defaults.items():
        if generic_key(key) == key and value is not None and not isinstance(value, list):
            assert f"`{json.dumps(value, ensure_ascii=False)}`" in rows[key], key


def _main(argv: list[str]) -> int:
    if argv == ["docs"]:
        text = DOCS.read_text(encoding="utf-8")
        start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
        DOCS.write_text(text[:start] + render_docs_table() + text[end:], encoding="utf-8")
        print(f"wrote the settings table of {DOCS}")
        return 0
    if argv == ["example"]:
        print(render_example_skeleton(), end="")
        return 0
    print("usage: python -m tests.test_settings docs|example", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is no package
        return False


def _stale_setting_names(text: str) -> list[str]:
    """Setting names in backticks (``section.key``, ``pipelines.<name>.key``) of ``text``
    that the Settings model does not have; module paths and file names are passed over."""
    keys = _leaf_generic_keys() | _all_generic_keys()
    sections = sorted({k.split(".")[0].split("[")[0] for k in keys})
    pattern = re.compile(r"`(" + "|".join(sections) + r")((?:\.[A-Za-z_<>]+|\[\d*\])+)[` =]")
    stale = []
    for match in pattern.finditer(text):
        section, rest = match.group(1), re.sub(r"\[\d*\]", "[]", match.group(2))
        parts = f"{section}{rest}".split(".")
        if section == "pipelines" and len(parts) >= 2:
            parts[1] = "<name>"
        key = ".".join(parts)
        if key in keys or any(k.startswith((f"{key}.", f"{key}[")) for k in keys):
            continue
        if re.search(r"\.(md|py|csv|json|crt|key|png|toml)$", key):
            continue
        if any(_is_module(f"sijnode.{name}") for name in (key, key.rsplit(".", 1)[0])):
            continue  # a module path (delivery.scheduler.enqueue_job)
        stale.append(key)
    return stale


def test_the_docs_name_only_settings_that_exist() -> None:
    """README.md and docs/*.md: every setting named in backticks is a key of the model
    (a renamed setting, such as pipelines.<name>.checkpoint -> model, is caught here)."""
    assert _stale_setting_names("a `pipelines.<name>.checkpoint` and `node.prot = 1`") == [
        "pipelines.<name>.checkpoint",
        "node.prot",
    ]
    assert (
        _stale_setting_names(
            "`pipelines.ct.model`, `delivery.scheduler.enqueue_job`, `reports.build`"
        )
        == []
    )
    found = {
        str(path.relative_to(ROOT)): stale
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        if (stale := _stale_setting_names(path.read_text(encoding="utf-8")))
    }
    assert found == {}
