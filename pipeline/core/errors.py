"""The small family of errors the pipeline raises on purpose.

Each is caught once, in `pipeline.core.stage.stage_main` or `pipeline.cli.main`, which prints the
message on one line and exits with `exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OpenReleaseError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""

    exit_code = 1


class ParamsError(OpenReleaseError):
    """params.yaml is invalid: unknown key, wrong type, out-of-range value."""

    exit_code = 2


class DataError(OpenReleaseError):
    """A data file breaks a rule. Names the file, the line or key, the rule and the value."""

    def __init__(self, path: str, where: str | int | None, rule: str, detail: str):
        self.path, self.where, self.rule, self.detail = str(path), where, rule, detail
        loc = f"{self.path}:{where}" if where is not None else self.path
        super().__init__(f"{loc}: {rule}: {detail}")


class SourceError(OpenReleaseError):
    """A model or data source is missing, unreachable or fails its checksum."""


class TrackingError(OpenReleaseError):
    """The MLflow tracking backend cannot be reached or written."""


class GateError(OpenReleaseError):
    """A release gate failed (publish)."""


class AuditError(OpenReleaseError):
    """A release failed verification (audit)."""
