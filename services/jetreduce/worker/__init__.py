"""The agent: runs setup, one slot-pool of map items, or reduce, for one workflow.

Started as a child process by the local launcher or as a pod of a Kubernetes Job, configured
by environment variables (``JETREDUCE_WORKFLOW_ID``, ``JETREDUCE_PHASE``…). Item data only ever
reaches a shell through environment variables (``interpolate.render_shell``), never as script
text, so it cannot be executed.
"""
