"""The one error a benchmark raises for a missing or unusable input, so the CLI can say it in one line."""

from __future__ import annotations


class BenchInputError(Exception):
    """A benchmark's input is missing or unusable (a results folder, the deploy files, an optional package);
    `promptintern bench` prints the message as one line and exits with status 2, without a traceback."""
