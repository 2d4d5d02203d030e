"""A JSON schema -> a regex whose every match is JSON that validates, for a documented subset (as
outlines did; xgrammar takes the full language through a grammar instead).

The subset, and the output it forces::

    {"type": "object", "properties": {...}, "required": [...]}
        -> {"a": <a>, "b": <b>}   the *required* properties, in the order of `properties`;
           optional properties are never written (the output still validates)
    {"type": "string"}            -> a JSON string ("..." with JSON's escapes; control
                                     characters only escaped); minLength / maxLength
    {"type": "integer"}           -> -?(0|[1-9][0-9]*)
    {"type": "number"}            -> an integer, optional fraction and exponent
    {"type": "boolean"}, {"type": "null"}
    {"enum": [...]}, {"const": v} -> exactly one of the values, as json.dumps writes them
    {"type": "array", "items": s} -> [s, s, ...]; minItems / maxItems
    {"type": [t1, t2]}, {"anyOf": [s1, s2]}   -> either
    nesting of all of these

Whitespace rule: one optional space after every ':' and ',' and none anywhere else, so
`json.dumps(value)` and `json.dumps(value, separators=(",", ":"))` both match. (Unbounded
whitespace lets a weak model pad forever; xgrammar's `any_whitespace` is the other choice.)

Anything else (`pattern`, `format`, `minimum`, `$ref`, `oneOf`, `additionalProperties` as a
schema, ...) raises `UnsupportedSchema` naming the keyword: with structured_outputs_backend
"auto" such a schema goes to xgrammar. Keywords that constrain nothing we write (`title`,
`description`, `additionalProperties: false`, `default`, ...) are ignored.
"""

from __future__ import annotations

import json
from typing import Any

from folovllm.structured_output.regex_dfa import UnsupportedRegex, escape

WS = "( )?"  # after ':' and ','
STRING_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
REGEX_FOR_TYPE = {
    "string": f'"{STRING_CHAR}*"',
    "integer": r"-?(0|[1-9][0-9]*)",
    "number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "boolean": "(true|false)",
    "null": "null",
}
IGNORED = {"title", "description", "$schema", "$id", "default", "examples", "$comment",
           "additionalProperties", "readOnly", "writeOnly", "deprecated"}
KNOWN = {
    "object": {"type", "properties", "required"},
    "string": {"type", "minLength", "maxLength"},
    "array": {"type", "items", "minItems", "maxItems"},
    "integer": {"type"}, "number": {"type"}, "boolean": {"type"}, "null": {"type"},
}


class UnsupportedSchema(UnsupportedRegex):
    """Valid JSON schema, but outside the folovllm backend's subset."""


def parse_schema(schema: Any) -> dict:
    """A schema given as a dict or a JSON string -> dict. ValueError when it is neither."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json: the schema is not valid JSON ({e})") from e
    if isinstance(schema, bool):
        raise UnsupportedSchema("json: a boolean schema")
    if not isinstance(schema, dict):
        raise ValueError(f"json: a schema must be a JSON object, got {type(schema).__name__}")
    return schema


# --8<-- [start:schema_to_regex]
def schema_to_regex(schema: Any) -> str:
    """The regex of every JSON value our subset writes for `schema`."""
    schema = parse_schema(schema)
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise ValueError("json: enum must be a non-empty list")
        return "(" + "|".join(escape(json.dumps(v)) for v in values) + ")"
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise ValueError("json: anyOf must be a non-empty list of schemas")
        return "(" + "|".join(schema_to_regex(s) for s in options) + ")"
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        return "(" + "|".join(schema_to_regex({**schema, "type": k}) for k in kind) + ")"
    if kind not in KNOWN:
        raise UnsupportedSchema(f"json: type {kind!r} (the folovllm backend knows {sorted(KNOWN)})")
    unknown = set(schema) - KNOWN[kind] - IGNORED
    if unknown:
        raise UnsupportedSchema(f"json: the keyword(s) {sorted(unknown)} on a {kind} schema")
    if isinstance(schema.get("additionalProperties"), dict):
        raise UnsupportedSchema("json: additionalProperties as a schema")
    if kind == "object":
        return _object(schema)
    if kind == "array":
        return _array(schema)
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        lo, hi = _bounds(schema, "minLength", "maxLength")
        return f'"{STRING_CHAR}{{{lo},{hi}}}"'
    return REGEX_FOR_TYPE[kind]


def _object(schema: dict) -> str:
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise ValueError("json: properties must be an object and required a list")
    missing = [name for name in required if name not in properties]
    if missing:
        raise UnsupportedSchema(f"json: required properties {missing} have no schema in properties")
    members = [escape(json.dumps(name)) + ":" + WS + schema_to_regex(sub)
               for name, sub in properties.items() if name in required]
    return r"\{" + ("," + WS).join(members) + r"\}"


def _array(schema: dict) -> str:
    if "items" not in schema:
        raise UnsupportedSchema("json: an array without 'items' (any JSON value)")
    item = schema_to_regex(schema["items"])
    lo, hi = _bounds(schema, "minItems", "maxItems")
    if hi == 0:
        return r"\[\]"
    rest = f"(,{WS}{item}){{{max(lo - 1, 0)},{'' if hi == '' else hi - 1}}}"
    return rf"\[{item}{rest}\]" if lo > 0 else rf"\[({item}{rest})?\]"
# --8<-- [end:schema_to_regex]


def _bounds(schema: dict, lo_key: str, hi_key: str) -> tuple[int, Any]:
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key, "")
    for name, value in ((lo_key, lo), (hi_key, hi)):
        if value != "" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"json: {name} must be an integer >= 0, got {value!r}")
    if hi != "" and hi < lo:
        raise ValueError(f"json: {hi_key} ({hi}) < {lo_key} ({lo})")
    return lo, hi
