"""Sections of the release stages: card and publish."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from pipeline.core.params.base import Section


class LicenseOverride(Section):
    """Publish under another license than the derived one, on purpose and with a reason."""

    license: str = Field(min_length=1, description="SPDX id to release under instead of the derived license.")
    reason: str = Field(min_length=20, description="Why; printed in both cards. At least a sentence.")


class CardParams(Section):
    """What the cards say that the pipeline cannot measure; every number in them comes from outputs."""

    language: list[str] = Field(min_length=1, description="ISO 639-1 codes of the languages of the data.")
    tags: list[str] = Field(default_factory=list, description="Extra Hub tags for both cards.")
    intended_use: list[str] = Field(min_length=1, description="What the model is for, one bullet each.")
    out_of_scope: list[str] = Field(min_length=1, description="What it is not for, one bullet each.")
    limitations: list[str] = Field(min_length=1, description="Known limitations, one bullet each.")
    judge_weaknesses: list[str] = Field(min_length=1, description="Known weaknesses of the win-rate judge.")
    license_override: LicenseOverride | None = Field(
        default=None, description="Set only to publish despite a license conflict; the reason goes in both cards.")
    code_repo_url: str | None = Field(
        default=None, description="Public https URL of this code repository, for the cards' reproduce steps; "
                                  "null: the git remote `origin` when it is a URL, else the bundled source archive.")

    @field_validator("code_repo_url")
    @classmethod
    def _https_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlparse

        if v is None:
            return v
        u = urlparse(v)
        if u.scheme != "https" or not u.hostname or u.username or u.password or " " in v:
            raise ValueError(f"{v!r} is not an https URL without credentials (e.g. https://github.com/org/repo)")
        return v


class MetricBound(Section):
    """A bound on one metrics/eval.json value."""

    min: float | None = Field(default=None, description="The value must be at least this.")
    max: float | None = Field(default=None, description="The value must be at most this.")

    @model_validator(mode="after")
    def _some_bound(self) -> MetricBound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


HUB_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PublishParams(Section):
    """Where the release goes and the gates it must pass first."""

    model_repo: str = Field(pattern=HUB_REPO_ID, description="Hub model repo id (namespace/name) for the weights.")
    dataset_repo: str = Field(pattern=HUB_REPO_ID, description="Hub dataset repo id for the preference data.")
    endpoint: str = Field(pattern=r"^https?://\S+$", description="Hub URL (https://huggingface.co or a mirror).")
    private: bool = Field(description="Create the repos private (they stay as they are if they exist).")
    version: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="Release version and Hub tag; null: the git tag at HEAD matching tag_pattern.")
    tag_pattern: str = Field(min_length=1, description="Regex a git tag must match to count as a release version.")
    allowed_licenses: list[str] = Field(min_length=1, description="SPDX ids this project may release under.")
    thresholds: dict[str, MetricBound] = Field(description="Bounds on metrics/eval.json values; a missing one fails.")
    beat_trivial_floor: bool = Field(default=True, description="Gate `trivial-floor`: the headline pass rate must "
                                     "exceed the best trivial answer's (pass_rate_floor). Off only for smoke "
                                     "configs whose model is random and can pass nothing.")
    previous_release: str | None = Field(
        default=None, description="A previous release to compare with: a bundle folder or `repo_id@revision` "
                                  "on the endpoint; null: no regression gate.")
    regression_tolerance: dict[str, float] = Field(
        description="Higher-is-better eval metrics and how far each may fall below the previous release.")
    contamination_ngram: int = Field(ge=5, le=50, description="Word n-gram length for the contamination gate.")
    include_adapter: bool = Field(description="Also publish the LoRA adapter folder beside the merged weights.")
    signing_key: str | None = Field(
        default=None, description="PEM elliptic-curve private key; OPENRELEASE_SIGNING_KEY overrides; "
                                  "null: a key pair generated under paths.keys.")
    public_key: str | None = Field(
        default=None, pattern=r"^[^/~\\][^:]*$",
        description="Repo-relative path of the signing key's PEM public key, committed in this repository; the "
                    "manifest names it and `openrelease audit --repo-key` reads it from a clone at the release "
                    "tag. null: audits must pin the key (--public-key) or use keyless signing.")

    @field_validator("regression_tolerance")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, t in v.items() if t < 0]
        if bad:
            raise ValueError(f"tolerances must be >= 0: {', '.join(bad)}")
        return v

    @field_validator("tag_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:

        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from None
        return v
