"""JSON Schemas of every event and of the normalised workflow, generated from the msgspec
types so they cannot drift (a test compares ``schemas/`` with a fresh generation).

``python -m jetreduce.contract.schemas DIR`` writes one file per schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from jetreduce.contract import events
from jetreduce.contract.records import StoredSpec, WorkflowRecord
from jetreduce.contract.workflow.model import Workflow

__all__ = ["generate", "structure", "write"]


def generate() -> dict[str, Any]:
    """File name → schema document."""
    docs: dict[str, Any] = {
        "event.schema.json": msgspec.json.schema(events.Event),
        "workflow.schema.json": msgspec.json.schema(Workflow),
        "workflow-record.schema.json": msgspec.json.schema(WorkflowRecord),
        "stored-spec.schema.json": msgspec.json.schema(StoredSpec),
        "submit-reply.schema.json": msgspec.json.schema(events.SubmitReply),
    }
    for name, doc in docs.items():
        doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        doc["$id"] = f"https://jetreduce.dev/schemas/{name}"
    return docs


# Keywords that carry prose for readers, not structure: msgspec copies docstrings into
# ``description``, and how it renders their indentation changes between its releases.
_PROSE = frozenset({"description", "title", "examples", "$comment"})
# Keywords whose value maps *names* (of properties, definitions) to schemas: a property
# called "description" is structure and must be kept.
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def structure(doc: Any) -> Any:
    """``doc`` without its prose: what the schema accepts (types, required fields, enums,
    formats, bounds), which is what a drift between the types and ``schemas/`` means.

    The committed files keep the prose; tests compare ``structure()`` of both sides so that
    a dependency that re-renders docstrings cannot fail them while a changed field still does.
    """
    if isinstance(doc, list):
        return [structure(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _PROSE:
            continue
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: structure(sub) for name, sub in value.items()}
        else:
            out[key] = structure(value)
    return out


def render(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in generate().items():
        path = directory / name
        path.write_text(render(doc))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(path)
