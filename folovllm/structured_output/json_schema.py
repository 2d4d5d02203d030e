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

`json_object` (any JSON object, vLLM's `response_format={"type": "json_object"}`) is not
regular: objects nest to any depth, and matching brackets needs a stack. `json_object_regex`
bounds the nesting at JSON_OBJECT_MAX_DEPTH containers, which makes it regular (the DFA's
state then remembers the open brackets, at most 2^depth stacks of objects and arrays).

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


JSON_OBJECT_MAX_DEPTH = 4  # {"a": {"b": {"c": [1]}}} is depth 4; deeper is xgrammar's


# --8<-- [start:json_object_regex]
def json_object_regex(max_depth: int = JSON_OBJECT_MAX_DEPTH) -> str:
    """Any JSON object whose containers nest at most `max_depth` deep (the object itself is
    depth 1), with the schema subset's whitespace rule::

        value(0) = string | number | true | false | null
        value(d) = value(0) | object(value(d - 1)) | array(value(d - 1))
        object(v) = { (string: v (, string: v)*)? }      array(v) = [ (v (, v)*)? ]
        json_object = object(value(max_depth - 1))

    Each depth writes the one below four times (twice in object, twice in array), so the
    pattern grows as 4^depth: 26 KB at depth 4, and its minimal DFA has 640 states (52 at
    depth 1, doubling with each depth: the open brackets are a stack of objects and arrays).
    Depth 5 passes the subset construction's state limit, which is why the bound is 4."""
    scalar = "(" + "|".join([REGEX_FOR_TYPE["string"], REGEX_FOR_TYPE["number"], "true", "false", "null"]) + ")"

    def obj(inner: str) -> str:
        member = REGEX_FOR_TYPE["string"] + ":" + WS + inner
        return r"\{(" + member + "(," + WS + member + ")*)?\}"

    def arr(inner: str) -> str:
        return r"\[(" + inner + "(," + WS + inner + ")*)?\]"

    value = scalar
    for _ in range(max_depth - 1):
        value = "(" + scalar + "|" + obj(value) + "|" + arr(value) + ")"
    return obj(value)
# --8<-- [end:json_object_regex]


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
