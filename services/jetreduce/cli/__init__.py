"""The ``jetreduce`` command line (typer). The only layer that configures logging, reads the
environment for settings, and hosts services in one process."""
