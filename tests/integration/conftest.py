"""Integration fixtures: the Redis and SQS (moto) servers of ``tests/backends.py``."""

from backends import aws_env, redis_server, sqs_server

__all__ = ["aws_env", "redis_server", "sqs_server"]
