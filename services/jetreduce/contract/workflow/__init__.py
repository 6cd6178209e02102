"""The workflow file contract: Prodigy MapReduce YAML in, a validated `Workflow` out.

Everything downstream (planner, workers, aggregator) reads `model.Workflow`, never raw YAML;
`parse_workflow` is the one place where the file's many accepted shapes are folded into it.
This package does not run anything, resolve item data or interpolate ``${item...}``.
"""

from jetreduce.contract.workflow.durations import parse_duration
from jetreduce.contract.workflow.errors import Problem, WorkflowInvalid
from jetreduce.contract.workflow.model import (
    CaptureFormat,
    ErrorPolicy,
    MapPhase,
    ReducePhase,
    RetryConfig,
    SetupPhase,
    Step,
    Workflow,
    WriteFile,
)
from jetreduce.contract.workflow.parse import ParseResult, parse_workflow, workflow_text

__all__ = [
    "CaptureFormat",
    "ErrorPolicy",
    "MapPhase",
    "ParseResult",
    "Problem",
    "ReducePhase",
    "RetryConfig",
    "SetupPhase",
    "Step",
    "Workflow",
    "WorkflowInvalid",
    "WriteFile",
    "parse_duration",
    "parse_workflow",
    "workflow_text",
]
