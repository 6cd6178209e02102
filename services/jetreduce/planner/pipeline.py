"""Moved to `jetreduce.lang.pipeline` (the language layer); kept as a re-export for callers
outside the planner (``cli/app.py``'s dry run) until they import it from there."""

from jetreduce.lang.pipeline import (
    InputItems,
    ItemPipeline,
    PipelineError,
    compile_filter,
    compile_json_path,
    compile_sort,
    is_line_stream,
    parse_input_document,
    parse_input_output,
    run_pipeline,
    select,
    validate_filter,
    validate_json_path,
    validate_sort,
)

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
