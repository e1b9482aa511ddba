"""Helpers shared by the test modules (no tests here); ``tests/`` is on ``sys.path``."""
