"""Chaos suite: real nats-server, services and agents as processes, SIGKILL everywhere."""
