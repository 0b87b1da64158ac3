"""The release: cards, the signed manifest, gates, publishing to the Hub and `openrelease audit`.

`bundle.build_bundle` lays out what would be uploaded (`model/` and `dataset/`, one folder per Hub
repo); `publish` runs the gates and uploads it; `audit` checks a bundle (a folder or a Hub repo)
against its manifest and signature. The `card` and `publish` stages call into here.
"""
