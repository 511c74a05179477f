"""What an image's "score" is, per protocol: written once, read by the PDF, its figures, the
service's explanation for the web page, and quoted by the README and docs/method.md.

The directional protocol (the default) fits no scoring model: an image's score is its
standardised value of the selected candidate feature, sign reversed so that higher means
more member-like. The reference and cross-fitted protocols fit one (a logistic regression on
the 26 features): an image's score is that model's estimate that the image is in P.
"""

from __future__ import annotations

#: One sentence per protocol; ``{feature}`` is the directional test's selected candidate.
SCORE_MEANING: dict[str, str] = {
    "directional": ("an image's score is its standardised value of the selected feature ({feature}), sign "
                    "reversed so that higher means more member-like; no scoring model is fitted"),
    "reference": ("an image's score is the scoring model's estimate that the image is in P (a logistic "
                  "regression on the features, fitted on the other part of each set)"),
    "crossfit": ("an image's score is the estimate that the image is in P by a scoring model (a logistic "
                 "regression on the features) fitted on the other folds, never on the image itself"),
}

#: The same, as a figure's axis label.
SCORE_AXIS: dict[str, str] = {
    "directional": "score: standardised {feature}, higher = more member-like",
    "reference": "score: the scoring model's estimate that an image is in P",
    "crossfit": "score: the scoring model's estimate that an image is in P",
}


def score_meaning(protocol: str, feature: str | None = None) -> str:
    """The sentence saying what a score is under ``protocol`` (lower case, no final stop)."""
    return SCORE_MEANING[protocol].format(feature=feature or "the selected feature")


def score_axis(protocol: str, feature: str | None = None) -> str:
    return SCORE_AXIS[protocol].format(feature=feature or "feature")


__all__ = ["SCORE_AXIS", "SCORE_MEANING", "score_axis", "score_meaning"]
