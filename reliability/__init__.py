"""Reliability demonstrations: kill -9 and resume, endurance, hostile inputs; each prints a figures table."""
