"""The item pipeline: from ``map.input`` bytes to the ordered list of work items.

Pure functions over plain JSON values (msgspec-decoded ``dict``/``list``/scalars); no
NATS, and no I/O beyond reading the spooled input file (``source``). The planner runs it
once per job; the workflow validator calls the ``validate_*`` helpers at submit time so a
bad expression is rejected before anything runs.

Stages, in Prodigy's order: ``json_path`` → ``filter`` → ``sort_by`` → ``distinct`` →
``offset`` → ``max_items``. Every error is a :class:`PipelineError` (a ``ValueError``).
"""

from jetreduce.lang.pipeline.filter import compile_filter, validate_filter
from jetreduce.lang.pipeline.input_parse import parse_input_document, parse_input_output
from jetreduce.lang.pipeline.jsonpath import (
    PipelineError,
    compile_json_path,
    select,
    validate_json_path,
)
from jetreduce.lang.pipeline.pipeline import ItemPipeline, run_pipeline
from jetreduce.lang.pipeline.sort import compile_sort, validate_sort
from jetreduce.lang.pipeline.source import InputItems, is_line_stream

__all__ = [
    "InputItems",
    "ItemPipeline",
    "PipelineError",
    "compile_filter",
    "compile_json_path",
    "compile_sort",
    "is_line_stream",
    "parse_input_document",
    "parse_input_output",
    "run_pipeline",
    "select",
    "validate_filter",
    "validate_json_path",
    "validate_sort",
]
