"""The workflow language: Prodigy MapReduce YAML read into the typed `contract.workflow` model,
and the pure pieces that give its expressions meaning.

A layer between ``contract`` (the wire types) and the services: it imports only ``contract``
(``tests/unit/test_layers.py``), opens no connection and reads no file it is not handed.
Everything a workflow file can get wrong is found here, once, at ``jetreduce validate`` and at
submit, with the file's line and column; the services then run what the parser built.

* `parse` (`parse_workflow`): YAML nodes → `Workflow`, every problem at once.
* `pipeline`: ``map.json_path``, ``filter``, ``sort_by``, ``distinct``, ``offset``,
  ``max_items`` (compiled at submit to validate them, run by the planner).
* `interpolate`: ``${...}`` references and their safe rendering into shell scripts.
* `when`: a step's condition, parsed at submit, evaluated by the worker.
"""

from jetreduce.lang._steps import MAX_HANDLER_DEPTH
from jetreduce.lang.parse import ParseResult, parse_workflow, workflow_text

__all__ = ["MAX_HANDLER_DEPTH", "ParseResult", "parse_workflow", "workflow_text"]
