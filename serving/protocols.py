"""Other servers' protocols on the same predict path: MLflow's scoring protocol and the Open Inference Protocol.

A client written for `mlflow models serve` (POST /invocations) or for KServe, Seldon, MLServer or Triton
(POST /v2/models/{name}/infer) works unchanged against `rollout serve`: it gets the champion's answer (or its
arm's, in an A/B test) while the rollout runs behind it, with every row logged as for /predict.

Each protocol turns its body into the native payload `{"records", "request_ids", "unit_id"?, "unit_ids"?}`
that `Predictor.predict` takes (one parser per protocol), and formats the answers and its errors in its own
shape: MLflow's `{"error_code", "message"}`, the Open Inference Protocol's `{"error"}`, each message naming
the field first, as /predict does.

Request ids, for labels sent later: the response's `x-request-id` header (and the v2 response's `id`) holds
the request's id; a request of n > 1 rows logs its rows as `<id>-0` .. `<id>-<n-1>`. A client may choose the
id (the `x-request-id` request header, or the v2 request's `id`), and the unit (`x-unit-id`, or the policy's
unit column in the rows). An MLflow body may also carry rollout's own `request_ids` / `unit_ids` lists
(MLflow's server ignores keys it does not know).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from rollout.models import ANY, BOOLEAN, INTEGER, NUMBER, STRING, ColumnSpec
from rollout.times import to_epoch
from serving.errors import RequestError
from serving.predict import REQUEST_ID_CHARS, new_request_id


MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
CSV, JSON, PARQUET = "text/csv", "application/json", "application/vnd.apache.parquet"


# ---------------------------------------------------------------------------------------------------------------
# What every protocol shares


@dataclass(frozen=True, slots=True)
class Context:
    """What a protocol's parser needs from the request and the service, read once per request."""

    headers: Mapping[str, str]  # lower-case names
    columns: tuple[ColumnSpec, ...] | None  # the champion's input contract (None: none declared)
    token_ok: Callable[[], bool]  # whether the request carries the admin token


def payload_of(records: list[Any], context: Context, request_id: str | None = None,
               extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
    """The native payload of a protocol's rows, and the request id to send back (None when the body listed
    every row's id). Row ids: the id itself for one row, `<id>-<i>` for several."""
    payload: dict[str, Any] = {"records": records}
    extra = extra or {}
    for key in ("unit_ids", "request_ids"):
        if key in extra:
            payload[key] = extra[key]
    unit = context.headers.get("x-unit-id")
    if unit is not None and "unit_ids" not in payload:
        payload["unit_id"] = unit
    if "request_ids" in payload:
        return payload, None
    base = context.headers.get("x-request-id") or request_id
    where = "x-request-id" if context.headers.get("x-request-id") else "id"
    if base is None:
        base = new_request_id()
    elif not isinstance(base, str):
        raise RequestError(422, f"{where}: expected a string")
    n = len(records) if isinstance(records, list) else 1
    room = REQUEST_ID_CHARS - (0 if n <= 1 else len(f"-{n - 1}"))
    if not base or len(base) > room or "\x00" in base:
        raise RequestError(422, f"{where}: expected 1 to {room} characters without NUL for a request of {n} rows "
                                f"(its rows are logged as <id>-<i>), got {len(base)}")
    payload["request_ids"] = [base] if n <= 1 else [f"{base}-{i}" for i in range(n)]
    return payload, base


def timestamp(value: Any, context: Context) -> float | None:
    """A simulated time (`ts`), honoured only with the admin token, as on /predict."""
    if value is None:
        return None
    if not context.token_ok():
        raise RequestError(403, "ts: an explicit timestamp needs the admin bearer token")
    try:
        return to_epoch(value)
    except (TypeError, ValueError) as exc:
        raise RequestError(422, f"ts: {exc}") from exc


def columnar(columns: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Records of a column -> values mapping (a scalar is one row)."""
    if not columns:
        raise RequestError(422, f"{where}: no columns")
    values = {k: (v if isinstance(v, list) else [v]) for k, v in columns.items()}
    lengths = {k: len(v) for k, v in values.items()}
    n = next(iter(lengths.values()))
    for name, length in lengths.items():
        if length != n:
            raise RequestError(422, f"{where}.{name}: {length} values, but {next(iter(lengths))} has {n}")
    names = list(values)
    return [dict(zip(names, row, strict=True)) for row in zip(*values.values(), strict=True)]


def tensor_rows(rows: list[Any], columns: tuple[ColumnSpec, ...] | None, where: str) -> list[dict[str, Any]]:
    """Records of a 2-D tensor whose columns are the champion's inputs in its signature's order."""
    if columns is None:
        raise RequestError(422, f"{where}: rows without column names need a model that declares its inputs")
    names = [c.name for c in columns]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(names):
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise RequestError(422, f"{where}[{i}]: expected {len(names)} values in the order {names}, got {got}")
        out.append(dict(zip(names, row, strict=True)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# MLflow's scoring protocol (POST /invocations)


def mlflow_records(body: Mapping[str, Any], columns: tuple[ColumnSpec, ...] | None) -> list[Any]:
    """The rows of an MLflow JSON body: `dataframe_split`, `dataframe_records`, `instances` or `inputs`."""
    keys = [k for k in MLFLOW_KEYS if k in body]
    if len(keys) != 1:
        raise RequestError(422, f"body: expected exactly one of {', '.join(MLFLOW_KEYS)}; got {sorted(body)}")
    key = keys[0]
    value = body[key]
    if key == "dataframe_split":
        if not isinstance(value, dict):
            raise RequestError(422, "dataframe_split: expected {'columns': [...], 'data': [[...], ...]}")
        names, data = value.get("columns"), value.get("data")
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise RequestError(422, "dataframe_split.columns: expected a list of column names")
        if not isinstance(data, list):
            raise RequestError(422, "dataframe_split.data: expected a list of rows")
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, list) or len(row) != len(names):
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise RequestError(422, f"dataframe_split.data[{i}]: expected {len(names)} values, one per column, "
                                        f"got {got}")
            out.append(dict(zip(names, row, strict=True)))
        return out
    if key == "dataframe_records":
        if not isinstance(value, list):
            raise RequestError(422, "dataframe_records: expected a list of objects")
        return value
    # TF-serving style: a list of records, a list of rows, or column -> values
    if isinstance(value, dict):
        return columnar(value, key)
    if isinstance(value, list):
        if value and all(isinstance(v, list) for v in value):
            return tensor_rows(value, columns, key)
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise RequestError(422, f"{key}[{i}]: expected a record (an object) or a row (a list of values), "
                                        f"got {type(item).__name__}")
        return value
    raise RequestError(422, f"{key}: expected a list of records or rows, or an object of columns")


def csv_records(body: bytes, columns: tuple[ColumnSpec, ...] | None) -> list[dict[str, Any]]:
    """The rows of a CSV body with a header line (pandas `to_csv(index=False)`), typed by the champion's inputs:
    an empty cell is null; a cell that does not read as its column's type is a 422 naming row and column."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body: not UTF-8 ({exc})") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise RequestError(422, "body: empty CSV (expected a header line, then rows)") from None
    except csv.Error as exc:
        raise RequestError(400, f"body: invalid CSV ({exc})") from exc
    kinds = {c.name: c.kind for c in columns or ()}
    out: list[dict[str, Any]] = []
    try:
        for i, row in enumerate(reader):
            if not row:
                continue
            if len(row) != len(header):
                raise RequestError(422, f"rows[{i}]: {len(row)} cells, the header has {len(header)}")
            out.append({name: _cell(cell, kinds.get(name, ANY), i, name) for name, cell in zip(header, row, strict=True)})
    except csv.Error as exc:
        raise RequestError(400, f"body: invalid CSV ({exc})") from exc
    return out


def _cell(text: str, kind: str, i: int, name: str) -> Any:
    if text == "":
        return None
    try:
        if kind == NUMBER:
            return float(text)
        if kind == INTEGER:
            return int(text)
        if kind == BOOLEAN:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(f"expected true or false, got {text!r}")
            return lowered in ("true", "1")
    except ValueError as exc:
        raise RequestError(422, f"rows[{i}].{name}: {exc}") from exc
    if kind == ANY:  # a column the signature does not type (a unit id, a segment): as JSON would carry it
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return text


def parquet_records(body: bytes) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(io.BytesIO(body))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise RequestError(400, f"body: not a Parquet file pandas can read ({exc})") from exc
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def mlflow_request(body: bytes, context: Context, loads: Callable[[bytes], Any]) -> tuple[dict[str, Any], float | None,
                                                                                         str | None]:
    """The native payload, simulated time and request id of a POST /invocations body."""
    content_type = context.headers.get("content-type", "")
    mime, _, parameters = content_type.partition(";")
    mime = mime.strip().lower()
    charset = next((v.strip().lower() for k, _, v in (p.partition("=") for p in parameters.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if charset not in ("utf-8", "utf8"):
        raise RequestError(415, f"content-type: only UTF-8 is read, got charset {charset}")
    extra: dict[str, Any] = {}
    ts = None
    if mime == CSV:
        records: list[Any] = csv_records(body, context.columns)
    elif mime == PARQUET:
        records = parquet_records(body)
    elif mime != JSON:
        raise RequestError(415, f"content-type: expected {JSON}, {CSV} or {PARQUET}, got {content_type or 'none'}")
    else:
        try:
            parsed = loads(body)
        except ValueError as exc:
            raise RequestError(400, f"body: invalid JSON ({exc})") from exc
        if not isinstance(parsed, dict):
            raise RequestError(422, f"body: expected a JSON object with one of {', '.join(MLFLOW_KEYS)}")
        params = parsed.get("params")
        if params is not None and not isinstance(params, dict):
            raise RequestError(422, "params: expected an object")
        records = mlflow_records(parsed, context.columns)
        extra = {k: parsed[k] for k in ("unit_ids", "request_ids") if k in parsed}
        ts = timestamp(parsed.get("ts"), context)
    payload, request_id = payload_of(records, context, extra=extra)
    return payload, ts, request_id



def mlflow_answer(answers: Sequence[Mapping[str, Any]], predict_fn: str) -> dict[str, Any]:
    """MLflow's response: `{"predictions": [...]}`, each what the model's pyfunc `predict_fn` returns (for
    rollout's own classifiers that is predict_proba: every class's probability)."""
    if predict_fn != "predict_proba":
        return {"predictions": [a["prediction"] for a in answers]}
    return {"predictions": [probabilities(a) for a in answers]}


def probabilities(answer: Mapping[str, Any]) -> Any:
    """A classifier's class probabilities from an answer (binary answers carry P(class 1) as the score)."""
    if "probabilities" in answer:
        return answer["probabilities"]
    score = answer["score"]
    return answer["prediction"] if score is None else [1.0 - score, score]


_MLFLOW_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST",
                 413: "REQUEST_LIMIT_EXCEEDED", 415: "BAD_REQUEST", 422: "BAD_REQUEST", 500: "INTERNAL_ERROR",
                 503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def mlflow_error(exc: RequestError) -> dict[str, Any]:
    """An error in MLflow's shape (`MlflowException.serialize_as_json`), the field first in the message."""
    body: dict[str, Any] = {"error_code": _MLFLOW_CODES.get(exc.status, "BAD_REQUEST"), "message": exc.message}
    if exc.errors:
        body["errors"] = exc.errors
    return body


def mlflow_version() -> str:
    """What MLflow's server answers on GET /version: the MLflow release installed."""
    return package_version("mlflow")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# The Open Inference Protocol, v2 (POST /v2/models/{name}/infer)

OIP_TYPES = {NUMBER: "FP64", INTEGER: "INT64", STRING: "BYTES", BOOLEAN: "BOOL", ANY: "FP64"}
_NUMPY_TYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
                "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
_INTEGER_TYPES = {t for t in _NUMPY_TYPES if "INT" in t}
OUTPUTS = ("predict", "predict_proba", "request_id", "version")


@dataclass(frozen=True, slots=True)
class InferRequest:
    payload: dict[str, Any]  # native: records and ids
    ts: float | None
    request_id: str | None
    outputs: list[str]


def infer_request(body: bytes, context: Context, loads: Callable[[bytes], Any], classification: bool) -> InferRequest:
    """An inference request: JSON, or JSON then binary tensors (Triton's binary data extension, which
    `tritonclient` uses by default; `inference-header-content-length` gives the JSON's size)."""
    declared = context.headers.get("inference-header-content-length")
    tail = b""
    if declared is not None:
        if not declared.isdigit() or int(declared) > len(body):
            raise RequestError(400, f"inference-header-content-length: {declared!r} is not a size within the body")
        body, tail = body[:int(declared)], body[int(declared):]
    try:
        parsed = loads(body)
    except ValueError as exc:
        raise RequestError(400, f"body: invalid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise RequestError(422, "body: expected an inference request object with 'inputs'")
    inputs = parsed.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(422, "inputs: expected a non-empty list of tensors")
    tensors = []
    offset = 0
    for k, tensor in enumerate(inputs):
        name, shape, values, used = _tensor(tensor, f"inputs[{k}]", tail, offset)
        offset += used
        tensors.append((name, shape, values))
    if offset != len(tail):
        raise RequestError(400, f"body: {len(tail) - offset} bytes of binary data that no input claims")
    records = _tensor_records(tensors, context.columns)
    parameters = parsed.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(422, "parameters: expected an object")
    outputs = _requested(parsed.get("outputs"), classification)
    request_id = parsed.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(422, "id: expected a string")
    payload, base = payload_of(records, context, request_id or None)
    return InferRequest(payload, timestamp(parameters.get("ts"), context), base, outputs)


def _tensor(tensor: Any, where: str, tail: bytes, offset: int) -> tuple[str, list[int], list[Any], int]:
    """A tensor's name, shape and flat values (row-major), and how many bytes of binary data it used."""
    if not isinstance(tensor, dict):
        raise RequestError(422, f"{where}: expected an object with name, shape, datatype and data")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not name:
        raise RequestError(422, f"{where}.name: expected a string")
    where = f"{where}({name})"
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(422, f"{where}.shape: expected a list of sizes, like [3] or [3, 1]")
    if datatype != "BYTES" and datatype not in _NUMPY_TYPES:
        raise RequestError(422, f"{where}.datatype: {datatype!r} is not one of BYTES, {', '.join(_NUMPY_TYPES)}")
    size = math.prod(shape)
    parameters = tensor.get("parameters") or {}
    binary = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    used = 0
    if binary is not None:
        if not isinstance(binary, int) or binary < 0 or offset + binary > len(tail):
            raise RequestError(400, f"{where}.parameters.binary_data_size: {binary!r} bytes are not in the body")
        values = _from_binary(tail[offset:offset + binary], datatype, where)
        used = binary
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise RequestError(422, f"{where}.data: expected a list of values")
        values = _flat(data)
    if len(values) != size:
        raise RequestError(422, f"{where}.data: {len(values)} values for shape {shape}")
    if datatype == "FP64" and all(type(v) is float and v == v for v in values):  # common: nothing to convert (NaN != NaN)
        return name, shape, values, used
    return name, shape, [_value(v, datatype, where, i) for i, v in enumerate(values)], used


def _flat(data: list[Any]) -> list[Any]:
    """Row-major values of flat or nested data (without recursion: the nesting comes from the caller)."""
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _from_binary(raw: bytes, datatype: str, where: str) -> list[Any]:
    if datatype != "BYTES":
        width = np.dtype(_NUMPY_TYPES[datatype]).itemsize
        if len(raw) % width:
            raise RequestError(400, f"{where}: {len(raw)} bytes is not a whole number of {datatype} values")
        return np.frombuffer(raw, dtype=_NUMPY_TYPES[datatype]).tolist()
    values: list[Any] = []
    i = 0
    while i < len(raw):  # each element: a 4-byte little-endian length, then the bytes
        if i + 4 > len(raw):
            raise RequestError(400, f"{where}: truncated BYTES element")
        n = int.from_bytes(raw[i:i + 4], "little")
        values.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return values


def _value(value: Any, datatype: str, where: str, i: int) -> Any:
    """A tensor element as a record value: text for BYTES, NaN as null, the type checked against the datatype
    (`where` and `i` name it in an error)."""
    if value is None:
        return None
    if datatype == "BYTES":
        if type(value) is str:
            return value
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(422, f"{where}.data[{i}]: not UTF-8 text ({exc})") from exc
        raise RequestError(422, f"{where}.data[{i}]: expected text for BYTES, got {type(value).__name__}")
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise RequestError(422, f"{where}.data[{i}]: expected true or false for BOOL, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(422, f"{where}.data[{i}]: expected a number for {datatype}, got {value!r}")
    if datatype in _INTEGER_TYPES and isinstance(value, float) and not value.is_integer():
        raise RequestError(422, f"{where}.data[{i}]: expected an integer for {datatype}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _tensor_records(tensors: list[tuple[str, list[int], list[Any]]],
                    columns: tuple[ColumnSpec, ...] | None) -> list[dict[str, Any]]:
    """Rows from named column tensors (each of shape [n] or [n, 1]: MLServer's `pd` content type, a Triton
    client's named inputs), or from one [n, k] tensor of the champion's inputs in signature order."""
    names = {c.name for c in columns} if columns is not None else None
    if len(tensors) == 1:
        name, shape, values = tensors[0]
        if len(shape) == 2 and shape[1] > 1 and (names is None or name not in names):
            k = shape[1]
            return tensor_rows([values[i * k:(i + 1) * k] for i in range(shape[0])], columns, f"inputs[0]({name})")
    out: dict[str, list[Any]] = {}
    for k, (name, shape, values) in enumerate(tensors):
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise RequestError(422, f"inputs[{k}]({name}).shape: a column's shape is [n] or [n, 1], got {shape}; "
                                    "one [n, k] tensor holds the model's inputs in its signature's order")
        if name in out:
            raise RequestError(422, f"inputs[{k}].name: {name!r} appears twice")
        out[name] = values
    return columnar(out, "inputs")


def _requested(outputs: Any, classification: bool) -> list[str]:
    if outputs is None:
        return ["predict"]
    offered = [o for o in OUTPUTS if classification or o != "predict_proba"]
    if not isinstance(outputs, list):
        raise RequestError(422, "outputs: expected a list of {'name': ...}")
    names = []
    for k, output in enumerate(outputs):
        name = output.get("name") if isinstance(output, dict) else None
        if name not in offered:
            raise RequestError(422, f"outputs[{k}].name: {name!r} is not an output of this model; it gives "
                                    f"{', '.join(offered)}")
        names.append(name)
    return names or ["predict"]


def infer_answer(answers: Sequence[Mapping[str, Any]], model_name: str, request: InferRequest,
                 classification: bool) -> dict[str, Any]:
    """The inference response: the requested outputs (`predict` by default), the answering version(s)."""
    n = len(answers)
    outputs = []
    for name in request.outputs:
        if name == "predict":
            outputs.append({"name": name, "shape": [n], "datatype": "INT64" if classification else "FP64",
                            "data": [a["prediction"] for a in answers]})
        elif name == "predict_proba":
            rows = [probabilities(a) for a in answers]
            width = len(rows[0]) if rows else 0
            outputs.append({"name": name, "shape": [n, width], "datatype": "FP64",
                            "data": [p for row in rows for p in row]})
        else:
            key = "request_id" if name == "request_id" else "version"
            outputs.append({"name": name, "shape": [n], "datatype": "BYTES", "data": [a[key] for a in answers]})
    versions = sorted({str(a["version"]) for a in answers})
    return {"model_name": model_name, "model_version": ",".join(versions), "id": request.request_id or "",
            "parameters": {"roles": sorted({str(a["role"]) for a in answers})}, "outputs": outputs}


def model_metadata(model_name: str, versions: Sequence[str], columns: tuple[ColumnSpec, ...] | None,
                   classification: bool, n_classes: int | None) -> dict[str, Any]:
    """GET /v2/models/{name}: the inputs from the champion's signature, the outputs this service gives."""
    inputs = [{"name": c.name, "datatype": OIP_TYPES.get(c.kind, "FP64"), "shape": [-1],
               "parameters": {"required": c.required, "nullable": c.nullable}} for c in columns or ()]
    outputs = [{"name": "predict", "datatype": "INT64" if classification else "FP64", "shape": [-1]}]
    if classification:
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, n_classes or -1]})
    outputs += [{"name": "request_id", "datatype": "BYTES", "shape": [-1]},
                {"name": "version", "datatype": "BYTES", "shape": [-1]}]
    return {"name": model_name, "versions": list(versions), "platform": "rollout", "inputs": inputs,
            "outputs": outputs, "parameters": {"content_type": "pd"}}


def oip_error(exc: RequestError) -> dict[str, Any]:
    """An error in the Open Inference Protocol's shape: `{"error": "..."}`."""
    body: dict[str, Any] = {"error": exc.message}
    if exc.errors:
        body["errors"] = exc.errors
    return body
