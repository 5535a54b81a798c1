"""JSON files from disk (manifests, records, configs) read as data that may be hostile.

``read_json`` never ends in a traceback: invalid JSON, text that is not UTF-8, nesting deep
enough to exhaust the parser's recursion, integers too long to convert, or a document of
the wrong type are one line naming the file (Phi3ExportError).
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3_export.errors import Phi3ExportError


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_json(path: Path, what: str = "a JSON object", expect: type = dict):
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise Phi3ExportError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise Phi3ExportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits, or nesting too deep
        raise Phi3ExportError(f"{path}: unreadable JSON ({type(exc).__name__})") from None
    except OSError as exc:
        raise Phi3ExportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(doc, expect):
        raise Phi3ExportError(f"{path}: must hold {what}, got a JSON {json_type(doc)}")
    return doc
