"""The workflow contract: the typed, validated `Workflow` every service reads.

Everything downstream (planner, workers, aggregator) reads `model.Workflow`, never raw YAML;
`jetreduce.lang.parse_workflow` is the one place where the file's many accepted shapes are
folded into it. This package holds the types (and the problems a parse reports), not the parser.
"""

from jetreduce.contract.workflow.durations import parse_duration
from jetreduce.contract.workflow.errors import Problem, WorkflowInvalid
from jetreduce.contract.workflow.model import (
    CaptureFormat,
    CaptureStreams,
    CircuitBreakerConfig,
    ErrorPolicy,
    MapPhase,
    OnFailure,
    ReducePhase,
    RetryConfig,
    Secret,
    SetupPhase,
    Step,
    Workflow,
    WriteFile,
)

__all__ = [
    "CaptureFormat",
    "CaptureStreams",
    "CircuitBreakerConfig",
    "ErrorPolicy",
    "MapPhase",
    "OnFailure",
    "Problem",
    "ReducePhase",
    "RetryConfig",
    "Secret",
    "SetupPhase",
    "Step",
    "Workflow",
    "WorkflowInvalid",
    "WriteFile",
    "parse_duration",
]
