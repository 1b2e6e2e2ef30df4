"""The HTTP API's OpenAPI document, generated from the protobuf messages its handlers parse and answer.

Each HTTP route turns its body into a ``fewshot.v1`` request message with protobuf's JSON mapping and answers
with the response message in that mapping (``server/http_api.py``), so the document's schemas are written
from the same message descriptors (:func:`message_schemas`): request bodies (JSON, and the multipart form of
image files), typed responses, and every status the service answers with, each with the one error body
``{"code", "message"}``. Nothing here is written by hand twice: a field added to the ``.proto`` appears in the
document, and the statuses come from the error classes of ``server/errors.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from fewshot.server.errors import ServiceError

#: Integer ranges of protobuf's integer types (the JSON mapping refuses values outside them).
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
ERROR = "Error"
#: What the schemas add to the descriptors where the service always refuses otherwise (the proto cannot say it).
REQUIRED = {"AdaptRequest": ("model", "support"), "ClassifyBody": ("queries",), "LabelledImage": ("image", "label")}
MIN_ITEMS = {("AdaptRequest", "support"): 1, ("ClassifyBody", "queries"): 1}


def error_statuses() -> list[int]:
    """The statuses of requests the service refuses (``http_status`` of every :class:`ServiceError` class),
    of a body it cannot read (400, 413) and of a bug (500)."""
    seen, todo = set(), [ServiceError]
    while todo:
        cls = todo.pop()
        seen.add(cls.http_status)
        todo.extend(cls.__subclasses__())
    return sorted(seen | {400, 413, 500})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def settings_schema(settings: Iterable[Any]) -> dict[str, Any]:
    """``AdaptSettings.values`` as the served models declare their settings (``SettingInfo``s, from each model's
    family): one property per setting name, its type, and its bounds or choices over all models (each model's
    own: ``ListModels``). A setting added to a head appears here with nothing else written."""
    merged: dict[str, dict[str, Any]] = {}
    for info in settings:
        if info.kind == "choice":
            entry = merged.setdefault(info.name, {"type": "string", "enum": []})
            entry["enum"] += [c for c in info.choices if c not in entry["enum"]]
        else:
            entry = merged.setdefault(info.name, {"type": info.kind, "minimum": info.min, "maximum": info.max})
            entry["minimum"], entry["maximum"] = min(entry["minimum"], info.min), max(entry["maximum"], info.max)
            if info.kind == "number":
                entry["type"] = "number"
    for entry in merged.values():
        entry["description"] = "bounds over the served models; each model's own: ListModels"
    return {"type": "object", "properties": dict(sorted(merged.items())), "additionalProperties": False}


#: Well-known protobuf messages whose JSON mapping is not an object of their fields: any JSON value.
_WELL_KNOWN: dict[str, dict[str, Any]] = {"google.protobuf.Value": {}}


def _message_type(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field (set on every field of ``TYPE_MESSAGE``)."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def _field_schema(field: FieldDescriptor, out: dict[str, Any]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[_message_type(field).full_name])
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = _message_type(field)
        if entry.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": _field_schema(entry.fields_by_name["value"], out)}
        _message(entry, out)
        item: dict[str, Any] = _ref(entry.name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None, field.full_name
        item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    elif field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        item = {"type": "integer", "minimum": low, "maximum": high}
    elif field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        item = {"type": "number"}
    elif field.type == FieldDescriptor.TYPE_BOOL:
        item = {"type": "boolean"}
    elif field.type == FieldDescriptor.TYPE_BYTES:
        item = {"type": "string", "format": "byte", "description": "base64"}
    else:
        item = {"type": "string"}
    return {"type": "array", "items": item} if field.is_repeated and not _is_map(field) else item


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).GetOptions().map_entry


def _message(descriptor: Descriptor, out: dict[str, Any], leave_out: tuple[str, ...] = (), name: str | None = None) -> None:
    name = name or descriptor.name
    if name in out:
        return
    out[name] = {}  # placeholder: recursive messages refer to it
    properties = {f.name: _field_schema(f, out) for f in descriptor.fields if f.name not in leave_out}
    for (owner, field), least in MIN_ITEMS.items():
        if owner == name:
            properties[field]["minItems"] = least
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if name in REQUIRED:
        schema["required"] = list(REQUIRED[name])
    if descriptor.oneofs:
        schema["description"] = "; ".join(
            f"at most one of {', '.join(f.name for f in o.fields)}" for o in descriptor.oneofs if not o.name.startswith("_")
        )
    out[name] = schema


def message_schemas(descriptors: list[tuple[Descriptor, tuple[str, ...], str]]) -> dict[str, Any]:
    """JSON Schemas (protobuf's JSON mapping, original field names) of ``(descriptor, fields left out, name)``
    and every message they contain, keyed by name, plus the error body."""
    out: dict[str, Any] = {}
    for descriptor, leave_out, name in descriptors:
        _message(descriptor, out, leave_out, name)
    out[ERROR] = {
        "type": "object",
        "required": ["code", "message"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "description": "the gRPC status name, e.g. NOT_FOUND"},
            "message": {"type": "string", "description": "what was wrong and what to do"},
        },
    }
    return out


def form_schema(descriptor: Descriptor, numbers: dict[str, type], images: bool, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The multipart form of a request with image files: ``images`` (files) and, for labelled ones, one
    ``labels`` field per file; the message's other scalar fields by name (``numbers``: their types in a form)
    and, for an Adapt, each setting of ``settings`` (:func:`settings_schema`) by its name."""
    properties: dict[str, Any] = {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}
    if images:
        properties["labels"] = {"type": "array", "items": {"type": "string"}}
    if "unlabeled" in descriptor.fields_by_name:  # an Adapt's unlabeled images (with report): files too
        properties["unlabeled"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE or field.name == "task_id":
            continue
        properties[field.name] = _field_schema(field, {})
        if field.name in numbers and properties[field.name].get("type") == "string":
            properties[field.name] = {"type": "integer" if numbers[field.name] is int else "number"}
    if settings is not None and "settings" in descriptor.fields_by_name:
        properties.update({k: v for k, v in settings["properties"].items() if k not in properties})
    return {"type": "object", "properties": properties, "additionalProperties": False}


def json_body(schema_name: str, form: dict[str, Any] | None = None) -> dict[str, Any]:
    """An operation's ``requestBody``: the message as JSON, and the multipart form where there is one."""
    content: dict[str, Any] = {"application/json": {"schema": _ref(schema_name)}}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


def responses(schema_name: str | None, statuses: list[int]) -> dict[int | str, Any]:
    """200 with ``schema_name`` and each error status with the error body."""
    out: dict[int | str, Any] = {}
    if schema_name is not None:
        out[200] = {"description": "OK", "content": {"application/json": {"schema": _ref(schema_name)}}}
    for status in statuses:
        out[status] = {"description": _REASONS.get(status, "error"), "content": {"application/json": {"schema": _ref(ERROR)}}}
    return out


_REASONS = {
    400: "invalid request",
    401: "missing or wrong token",
    404: "no such task or model",
    405: "method not allowed",
    409: "the task changed meanwhile (expected_version)",
    412: "the task cannot be updated this way",
    413: "request too large",
    429: "quota, admission or body budget used up: retry after a back-off",
    500: "internal error (a bug)",
    503: "backend unavailable or stopping",
    504: "deadline passed",
}
