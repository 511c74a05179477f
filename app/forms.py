"""The submit form of ``POST /v1/audits``, declared once as typed models.

:class:`AuditOptionsForm` holds the form's plain fields (their names, types, ranges and
defaults): :func:`app.uploads.parse_options` validates with it, the OpenAPI description of
the form is generated from :class:`AuditForm` (:func:`form_schema`), and the web page reads
that description to build its option fields. Nothing else spells the options out.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from cdi.options import (
    DEFAULT_ALPHA,
    DEFAULT_PROTOCOL,
    MAX_ALPHA,
    MAX_LOOKS,
    Protocol,
    SequentialOptions,
    minimum_sizes,
)

__all__ = ["FEATURE_SETS", "PRECISIONS", "PROTOCOLS", "SPENDING_RULES", "AuditForm", "AuditOptionsForm",
           "FeatureSetName", "PrecisionName", "ProtocolName", "SpendingName", "form_schema"]

ProtocolName = Literal["directional", "crossfit", "reference"]
FeatureSetName = Literal["verdict", "all", "gradient-free"]
PrecisionName = Literal["fp32", "auto", "bf16", "fp16"]
PROTOCOLS: tuple[str, ...] = get_args(ProtocolName)
FEATURE_SETS: tuple[str, ...] = get_args(FeatureSetName)
#: The values of :data:`cdi.features.passes.PRECISIONS` (a test keeps them equal).
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
#: The values of :class:`cdi.options.Spending` (a test keeps them equal).
SpendingName = Literal["obrien-fleming", "pocock"]
SPENDING_RULES: tuple[str, ...] = get_args(SpendingName)
_SEQUENTIAL = SequentialOptions()


def _minimum_sizes_sentence() -> str:
    """The fewest images each protocol accepts, in words (the form's description of ``protocol``)."""
    sizes = {p.value: minimum_sizes(p) for p in Protocol}
    if len(set(sizes.values())) == 1:
        s = next(iter(sizes.values()))
        return (f"Every protocol needs at least {s.p} published and {s.u} unpublished images (the negative "
                "control splits U into two halves).")
    listed = "; ".join(f"`{name}`: {s.p} and {s.u}" for name, s in sizes.items())
    return (f"The fewest published and unpublished images: {listed} (the negative control splits U into two "
            "halves).")

_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


class AuditOptionsForm(BaseModel):
    """The audit's options and callback, as the form's text fields."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    alpha: float = Field(DEFAULT_ALPHA, gt=0.0, lt=MAX_ALPHA, allow_inf_nan=False,
                         description="Significance level α of the test: `used` needs p < α.")
    protocol: ProtocolName = Field(
        DEFAULT_PROTOCOL.value,
        description="`directional` (the default): the largest Welch t over the loss-type features, whose "
                    "direction the method fixes, with a permutation p-value resolved down to 1e-6; "
                    "`crossfit`: every image scored by a model that never saw it, permutation test; "
                    "`reference`: the published method's split and Welch test. " + _minimum_sizes_sentence())
    features: FeatureSetName = Field(
        "verdict", description="`verdict` (the default): only the features the verdict reads (about a fifth of "
                               "the network passes of all 26, the same verdict); `all`: all 26 features, for "
                               "studying them; `gradient-free`: the families that need no gradient.")
    precision: PrecisionName = Field(
        "fp32", description="The network passes' arithmetic: `fp32` (the default), `auto` (bfloat16 on a GPU, "
                            "float32 on a CPU), `bf16` or `fp16`. Features computed at another precision are "
                            "cached apart.")
    batch_size: str | None = Field(
        None, pattern=r"^(auto|[1-9][0-9]{0,2}|10[01][0-9]|102[0-4])$",
        description="Images per batch (1 to 1024), or `auto`: sized from the accelerator's free memory (default: "
                    "the deployment's).")
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds every random draw: the same seed, the same report.")
    sequential: bool = Field(
        _SEQUENTIAL.enabled,
        description="Extract and test the images in rounds and stop once the evidence is clear (fewer network "
                    "passes; the false-positive rate stays at most α). Directional protocol only.")
    looks: int = Field(_SEQUENTIAL.looks, ge=1, le=MAX_LOOKS,
                       description="Sequential audits: how many looks (rounds) at most.")
    spending: SpendingName = Field(
        _SEQUENTIAL.spending.value,
        description="Sequential audits: how α is spent over the looks (`pocock`: about evenly, stops earlier; "
                    "`obrien-fleming`: mostly at the last look).")
    futility: bool = Field(_SEQUENTIAL.futility,
                           description="Sequential audits: also stop `not_detected` at a look where P does not "
                                       "lean towards used.")
    callback_url: str | None = Field(
        None, max_length=2000, pattern=r"^https?://[^\s/?#]+", json_schema_extra={"format": "uri"},
        description="http(s) URL POSTed the final status JSON when the audit ends.")


class AuditForm(AuditOptionsForm):
    """The whole form: one ``archive``, or ``published`` and ``unpublished``; a ``model``; options."""

    model: str = Field(min_length=1, max_length=200, description="A model id from GET /v1/models.")
    reference_model: str | None = Field(
        None, min_length=1, max_length=200,
        description="A model id from GET /v1/models, usually the base of the fine-tune audited: every feature "
                    "is calibrated against it (the fine-tune's minus the reference's, with the same noise).")
    archive: bytes | None = Field(None, description="One zip holding published/ and unpublished/ folders "
                                                    "(optionally inside one top folder).")
    published: bytes | None = Field(None, description="A zip of the published images (P).")
    unpublished: bytes | None = Field(None, description="A zip of the unpublished images (U).")
    captions: bytes | None = Field(None, description='CSV (header file,caption) or JSON Lines {"file": ..., '
                                                     '"caption": ...}, keyed by image file name.')
    labels: bytes | None = Field(None, description='CSV (header file,label) or JSON Lines {"file": ..., '
                                                   '"label": ...}; class-conditional models need one per image.')
    retain_images: bool = Field(False, description="Keep the images after the audit ends (default: they are "
                                                   "deleted then; the report keeps their SHA-256s).")


def _flatten(prop: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, null]`` → X (a form field is absent, never null); bytes → a file part."""
    variants = prop.get("anyOf")
    if variants:
        kept = [v for v in variants if v.get("type") != "null"]
        if len(kept) == 1:
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **kept[0]}
    if prop.get("type") == "string" and prop.get("format") in ("binary", "base64"):
        prop = {**prop, **_BINARY}
    if prop.get("default", 0) is None:
        prop = {k: v for k, v in prop.items() if k != "default"}
    return prop


def form_schema() -> dict[str, Any]:
    """The OpenAPI schema of the multipart form, generated from :class:`AuditForm`."""
    schema = AuditForm.model_json_schema()
    properties = {name: _flatten(prop) for name, prop in schema["properties"].items()}
    # The model first, then the images, then the options: the order a person fills them in.
    order = ["model", "reference_model", "archive", "published", "unpublished", "alpha", "protocol", "features",
             "precision", "batch_size", "seed", "sequential", "looks", "spending", "futility", "captions", "labels",
             "callback_url", "retain_images"]
    properties = {k: properties[k] for k in order if k in properties} | properties
    return {"title": "AuditForm", "description": AuditForm.__doc__, "type": "object", "properties": properties,
            "required": ["model"],
            "anyOf": [{"required": ["archive"]}, {"required": ["published", "unpublished"]}]}
