"""Subscribers that turn published facts into logs, metrics and reports."""
