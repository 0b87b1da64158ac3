"""The base of every params section and the patterns several sections share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SHA256_HEX = r"^[0-9a-f]{64}$"
GIT_COMMIT = r"^[0-9a-f]{40}$"
HF_DATASET = r"hf://datasets/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?@[0-9a-f]{40}"


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
