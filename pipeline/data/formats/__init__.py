"""One reader per source format: `read(path, source_cfg, exclude=None) -> Iterator[dict]` of normalised rows
(`exclude`: a takedown filter, records it drops are never read).

`READERS` maps the `format` of a `data.sources` entry to its reader; `RATING_RANGES` gives each
format's rating scale (a source's `rating_range` overrides it). The row layout, positions and error
conventions are described in `pipeline.data.formats.common`.
"""

from __future__ import annotations

from pipeline.data.formats import hh_rlhf, pairs, rated, sharegpt, ultrafeedback

READERS = {
    "ultrafeedback": ultrafeedback.read,
    "hh-rlhf": hh_rlhf.read,
    "pairs": pairs.read,
    "sharegpt": sharegpt.read,
    "rated": rated.read,
}

RATING_RANGES = {
    "ultrafeedback": ultrafeedback.RATING_RANGE,
    "hh-rlhf": hh_rlhf.RATING_RANGE,
    "pairs": pairs.RATING_RANGE,
    "sharegpt": sharegpt.RATING_RANGE,
    "rated": rated.RATING_RANGE,
}


def rating_range(source_cfg) -> tuple[float, float]:
    """The allowed [min, max] of a source's ratings."""
    return tuple(source_cfg.rating_range) if source_cfg.rating_range is not None else RATING_RANGES[source_cfg.format]
