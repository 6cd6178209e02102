"""The planner: validates submissions, expands the map input into items, enqueues them.

Listens to ``workflow.submit`` (answers accepted/rejected, all problems at once) and
``setup.completed`` (the raw input is then in the object store: json_path → filter → sort_by →
distinct → offset → max_items, then a pipelined, idempotent enqueue). Holds no state.
"""
