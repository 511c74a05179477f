"""The report (cdi.report): schema, content, canonical digest, signature, recomputation, CLI, service.

Most reports here come from :func:`synthetic_result`: the library's own test, controls and
verdict run on synthetic features (no model), which gives each verdict in well under a
second. One test runs the real ``cdi audit`` on a tiny random-weight model end to end.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdi.audit import AuditImage, AuditOptions, AuditResult
from cdi.cli import main
from cdi.controls import (
    IMAGE_STATISTIC_NAMES,
    DuplicateGroup,
    DuplicatePair,
    DuplicateReport,
    ImageRef,
    direction_check,
    distribution_check,
    duplicates_to_exclude,
    negative_control,
)
from cdi.features.layout import FEATURE_NAMES
from cdi.provenance import versions
from cdi.reads import DIRECTION_FEATURES
from cdi.report import (
    SCHEMA_PATH,
    ReportFormatError,
    build_report,
    canonical_json,
    content_digest,
    json_schema,
    load_public_key,
    parse_report,
    recompute_document,
    report_json,
    result_to_dict,
    schema_json,
    seal,
    seal_document,
    signing_key_from_env,
    verify_document,
)
from cdi.report.canonical import format_number
from cdi.stats import run_test
from cdi.verdict import decide


def synthetic_result(kind: str, *, protocol: str = "crossfit", features: str = "all", seed: int = 0,
                     n_p: int = 30, n_u: int = 40, duplicates: bool = False) -> AuditResult:
    """An AuditResult from the library's test, controls and verdict on synthetic features.

    ``kind``: ``used`` (P's loss-type features lower, as for training images), ``null`` (no
    difference) or ``shift`` (P's image statistics differ: inconclusive).
    """
    rng = np.random.default_rng(seed)
    options = AuditOptions(seed=seed, protocol=protocol, features=features, n_permutations=199,  # type: ignore[arg-type]
                           max_permutations=20_000)
    feats = rng.normal(size=(n_p + n_u, len(FEATURE_NAMES)))
    if kind in ("used", "shift"):
        loss = [FEATURE_NAMES.index(n) for n in DIRECTION_FEATURES]
        feats[:n_p] -= 0.4
        feats[:n_p, loss] -= 0.8
    not_computed = [c for c in range(len(FEATURE_NAMES)) if c not in options.columns]
    feats[:, not_computed] = np.nan
    stats = rng.normal(size=(n_p + n_u, len(IMAGE_STATISTIC_NAMES)))
    if kind == "shift":
        stats[:n_p, :6] += 2.0
    is_p = np.arange(n_p + n_u) < n_p
    cols = options.tested_columns
    xp, xu = feats[is_p][:, cols], feats[~is_p][:, cols]
    test = run_test(xp, xu, protocol, options.protocol_options, alpha=options.alpha, random_state=seed)
    control = negative_control(xu, protocol, options.protocol_options, alpha=options.alpha, random_state=seed + 1)
    dist = distribution_check(stats[is_p], stats[~is_p], random_state=seed + 2, n_permutations=199)
    verdict = decide(test, control, dist, reversal_p=direction_check(feats[is_p], feats[~is_p]))
    images = [AuditImage(f"{'p' if i < n_p else 'u'}-{i:03d}.png", hashlib.sha256(f"{kind}{i}".encode()).hexdigest(),
                         "P" if i < n_p else "U", feats[i]) for i in range(n_p + n_u)]
    dups = DuplicateReport((), (), 4)
    if duplicates:
        a, b = ImageRef("P", 3, "dup-a.png"), ImageRef("U", 7, "dup-b.png")
        dups = DuplicateReport((DuplicatePair("exact", "between", a, b, 0),),
                               (DuplicateGroup("exact", "between", (a, b)),), 4)
    weights = {"unet/diffusion_pytorch_model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    return AuditResult(
        verdict=verdict, test=test, negative_control=control, distribution=dist, duplicates=dups,
        exclusion=duplicates_to_exclude(dups), images_p=tuple(images[:n_p]), images_u=tuple(images[n_p:]),
        options=options,
        model={"source": "synthetic/model", "revision": "abc123", "digest": hashlib.sha256(b"model").hexdigest(),
               "weight_sha256": weights, "family": "pixel", "conditioning": "none", "image_channels": 1,
               "image_size": 16, "num_train_timesteps": 1000, "device": "cpu", "dtype": "float32"},
        feature_key=hashlib.sha256(b"key").hexdigest(), forward_passes=51 * (n_p + n_u),
        backward_passes=10 * (n_p + n_u), cached_images=0,
        timings={"validating": 0.1, "loading": 0.2, "extracting": 3.0, "scoring": 0.4, "testing": 0.5},
        versions=versions(),
    )


@pytest.fixture(scope="module")
def results() -> dict[str, AuditResult]:
    out = {
        "used": synthetic_result("used"),
        "not_detected": synthetic_result("null", seed=3),
        "inconclusive": synthetic_result("shift", seed=1),
        "reference": synthetic_result("used", protocol="reference", features="gradient-free", seed=2,
                                      duplicates=True),
        "directional": synthetic_result("used", protocol="directional", seed=4),
        "verdict": synthetic_result("used", protocol="directional", features="verdict", seed=5),
    }
    for name in ("used", "not_detected", "inconclusive"):
        assert out[name].outcome == name, out[name].verdict.reason
    return out


@pytest.fixture(scope="module")
def documents(results: dict[str, AuditResult]) -> dict[str, dict[str, Any]]:
    """Each result's sealed report as read back from its JSON file."""
    return {k: json.loads(report_json(seal(build_report(r)))) for k, r in results.items()}


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    root = tmp_path_factory.mktemp("keys")
    key = Ed25519PrivateKey.generate()
    private = root / "signing-key.pem"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public = root / "signing-key.pub.pem"
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    other = root / "other.pub.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return {"key": key, "private": private, "public": public, "other": other}


# --- schema -----------------------------------------------------------------------------------


def test_committed_schema_is_generated_from_the_model() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_json(), "run: python -m cdi.report"
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$id"] == "urn:cdi-audit:schema:cdi-report-1"
    assert schema["properties"]["schema_version"]["const"] == "cdi-report/1"


def test_reports_validate_against_the_published_schema(documents: dict[str, dict[str, Any]]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for name, doc in documents.items():
        errors = sorted(validator.iter_errors(doc), key=str)
        assert not errors, (name, errors[:3])
    bad = copy.deepcopy(documents["used"])
    bad["images"][0]["sha256"] = "not-a-hash"
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(documents["used"])
    bad["surprise"] = 1
    assert not validator.is_valid(bad)
    assert json_schema() == schema


# --- content ----------------------------------------------------------------------------------


def test_report_holds_the_verdict_the_controls_every_image_and_the_manifest(results, documents) -> None:
    r, doc = results["used"], documents["used"]
    assert doc["schema_version"] == "cdi-report/1"
    assert doc["verdict"] == "used" and doc["p_value"] == r.p_value == doc["test"]["p_value"]
    t = doc["test"]
    assert (t["statistic"], t["direction"], t["auc"], t["cohens_d"]) == (
        r.test.statistic, r.test.direction, r.test.auc, r.test.cohens_d)
    assert (t["n_p"], t["n_u"], t["protocol"], t["alpha"], t["df"]) == (30, 40, "crossfit", 0.01, None)
    c = doc["controls"]
    assert c["negative_control"]["p_value"] == r.negative_control.p_value
    assert len(c["negative_control"]["rows"]) == 40
    assert c["direction_check"]["p_value"] == r.verdict.reversal_p and not c["direction_check"]["failed"]
    assert c["distribution_check"]["auc"] == r.distribution.auc
    assert c["distribution_check"]["p_value"] == r.distribution.p_value
    assert c["duplicates"]["groups"] == [] and c["excluded"] == {"p": [], "u": [], "reasons": []}
    rows = doc["images"]
    assert [row["set"] for row in rows] == ["P"] * 30 + ["U"] * 40
    for row, im in zip(rows, r.images_p + r.images_u, strict=True):
        assert row["sha256"] == im.sha256 and row["name"] == im.name
        assert row["role"] == "test" and row["fold"] in range(5) and 0.0 <= row["score"] <= 1.0
        assert row["features"] == im.features.tolist()
    m = doc["manifest"]
    assert m["model"]["weight_sha256"] == r.model["weight_sha256"] and m["model"]["revision"] == "abc123"
    assert m["seeds"] == {"audit": 0, "test": r.test.random_state, "negative_control_split": 1,
                          "negative_control_test": r.negative_control.test.random_state, "distribution_check": 2}
    assert m["options"]["n_permutations"] == 199 and m["options"]["feature_config"]["dl_t"] == 100
    assert {"torch", "diffusers", "scikit-learn", "scipy", "numpy", "cdi-audit"} <= set(m["versions"])
    assert m["timings_seconds"]["extracting"] == 3.0 and m["passes"]["forward"] == 51 * 70
    assert doc["decision"]["test_significant"] and doc["service"] is None
    again = result_to_dict(r)  # the same sealed report, in one call
    assert again == {**doc, "created_at": again["created_at"], "integrity": again["integrity"]}
    assert verify_document(again).ok


def test_reference_report_marks_fit_rows_and_features_not_computed(results, documents) -> None:
    doc = documents["reference"]
    assert doc["test"]["protocol"] == "reference" and doc["test"]["df"] > 0
    roles = [row["role"] for row in doc["images"]]
    assert roles.count("fit") == doc["test"]["n_fit_p"] + doc["test"]["n_fit_u"]
    assert all(row["score"] is None for row in doc["images"] if row["role"] == "fit")
    gm = FEATURE_NAMES.index("gm_t000")
    assert all(row["features"][gm] is None for row in doc["images"])
    assert "gm_t000" not in doc["feature_layout"]["used"]
    ex = doc["controls"]["excluded"]
    assert ex["p"] == [3] and ex["u"] == [7] and "dup-a.png" in ex["reasons"][0]


def test_a_verdict_report_records_its_feature_set_and_marks_the_others_not_computed(results, documents) -> None:
    doc = documents["verdict"]
    layout = doc["feature_layout"]
    read = ["dl", "pia", "ml_t000", "ml_t100", "ml_t200", "ml_t300"]
    assert doc["manifest"]["options"]["features"] == "verdict"
    assert layout["computed"] == read and layout["used"] == read
    for row in doc["images"]:
        values = dict(zip(layout["names"], row["features"], strict=True))
        assert all(values[n] is not None for n in read)
        assert all(v is None for n, v in values.items() if n not in read)
    assert verify_document(doc).ok
    # A value where the report says nothing was computed is data posing as not computed.
    bad = json.loads(json.dumps(doc))
    bad["images"][0]["features"][FEATURE_NAMES.index("gm_t000")] = 1.0
    with pytest.raises(ReportFormatError, match="did not compute"):
        parse_report(bad)
    # The same test as the audit of all 26 features would have run: the test reads the same columns.
    full = synthetic_result("used", protocol="directional", features="all", seed=5)
    assert full.p_value == results["verdict"].p_value and full.outcome == results["verdict"].outcome


def test_non_finite_statistics_are_written_as_strings(results) -> None:
    import dataclasses

    r = results["used"]
    odd = dataclasses.replace(r, test=dataclasses.replace(r.test, cohens_d=math.inf))
    doc = json.loads(report_json(seal(build_report(odd))))
    assert doc["test"]["cohens_d"] == "Infinity"
    assert parse_report(doc).test.cohens_d == math.inf
    assert verify_document(doc).ok


def test_inconsistent_reports_are_refused(documents) -> None:
    doc = copy.deepcopy(documents["not_detected"])
    doc["verdict"] = "used"
    with pytest.raises(ReportFormatError, match="decision rule gives not_detected"):
        parse_report(doc)
    doc = copy.deepcopy(documents["used"])
    doc["p_value"] = 0.5
    with pytest.raises(ReportFormatError, match="p_value differs"):
        parse_report(doc)
    with pytest.raises(ReportFormatError, match="schema"):
        parse_report({**documents["used"], "schema_version": "cdi-report/9"})


# --- canonical JSON and the digest -----------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "0"), (-0.0, "0"), (5.0, "5"), (4.5, "4.5"), (0.002, "0.002"), (1e-6, "0.000001"), (1e-7, "1e-7"),
    (1e21, "1e+21"), (1e20, "100000000000000000000"), (333333333.3333333, "333333333.3333333"),
    (0.1 + 0.2, "0.30000000000000004"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (-1.5e-9, "-1.5e-9"), (123, "123"),
])
def test_numbers_are_written_as_rfc8785_requires(value: float, text: str) -> None:
    assert format_number(value) == text


def test_canonical_json_sorts_keys_and_escapes_only_what_it_must() -> None:
    data = {"b": [1, 2.5, None, True], "a": {"é": "x\n\"\u0001", "Z": False}, "\u20ac": 1, "\U0001f600": 2}
    text = canonical_json(data).decode("utf-8")
    assert text == '{"a":{"Z":false,"é":"x\\n\\"\\u0001"},"b":[1,2.5,null,true],"€":1,"😀":2}'
    with pytest.raises(ReportFormatError):
        canonical_json({"x": math.nan})


def test_digest_covers_everything_but_integrity_and_service(documents) -> None:
    doc = documents["used"]
    body = {k: v for k, v in doc.items() if k not in ("integrity", "service")}
    assert doc["integrity"]["digest"] == hashlib.sha256(canonical_json(body)).hexdigest() == content_digest(doc)
    assert content_digest({**doc, "service": {"audit_id": "x"}}) == content_digest(doc)
    # Whitespace and key order of the file do not matter; its numbers and strings do.
    reordered = json.loads(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    assert content_digest(reordered) == content_digest(doc)


# --- verify ------------------------------------------------------------------------------------


def test_verify_accepts_a_sealed_report_and_a_service_block(documents) -> None:
    doc = documents["not_detected"]
    assert verify_document(doc).ok
    with_service = {**doc, "service": {"audit_id": "a1", "finished_at": "2026-01-01T00:00:00Z"}}
    v = verify_document(with_service)
    assert v.ok and v.signature == "absent" and v.report is not None and v.report.service is not None


@pytest.mark.parametrize("change", ["score", "feature", "revision", "name", "seed"])
def test_changing_any_value_fails_verification(documents, change: str) -> None:
    doc = copy.deepcopy(documents["used"])
    if change == "score":
        doc["images"][5]["score"] = doc["images"][5]["score"] * (1 + 1e-15) + 1e-17
    elif change == "feature":
        doc["images"][0]["features"][0] += 1.0
    elif change == "revision":
        doc["manifest"]["model"]["revision"] = "other"
    elif change == "name":
        doc["images"][1]["name"] = "someone-else.png"
    else:
        doc["manifest"]["seeds"]["test"] += 1
    v = verify_document(doc)
    assert not v.ok and any("digest mismatch" in p for p in v.problems)


def test_signature_with_a_deployment_key(results, key_pair, monkeypatch) -> None:
    monkeypatch.setenv("CDI_SIGNING_KEY", str(key_pair["private"]))
    key = signing_key_from_env()
    assert key is not None
    doc = json.loads(report_json(seal(build_report(results["used"]), key)))
    sig = doc["integrity"]["signature"]
    assert sig["algorithm"] == "ed25519" and len(base64.b64decode(sig["public_key"])) == 32
    trusted = load_public_key(key_pair["public"])
    v = verify_document(doc, trusted)
    assert v.ok and v.signature == "valid" and v.trusted_key is True
    assert load_public_key(sig["public_key"].encode()) is not None  # the base64 form is accepted too
    # Not the trusted key: fails, though the signature itself is valid.
    v = verify_document(doc, load_public_key(key_pair["other"]))
    assert not v.ok and v.signature == "valid" and v.trusted_key is False
    # A changed report whose digest was recomputed by the forger: the signature no longer matches.
    forged = copy.deepcopy(doc)
    forged["images"][0]["score"] = 0.5
    forged["integrity"]["digest"] = content_digest(forged)
    v = verify_document(forged, trusted)
    assert not v.ok and v.signature == "invalid"
    # An unsigned report, when a trusted key is expected.
    unsigned = seal_document(doc)
    assert unsigned["integrity"]["signature"] is None
    assert not verify_document(unsigned, trusted).ok
    # The PEM text itself in the variable works too; a bad key is a clear error.
    monkeypatch.setenv("CDI_SIGNING_KEY", key_pair["private"].read_text())
    assert signing_key_from_env() is not None
    monkeypatch.setenv("CDI_SIGNING_KEY", str(key_pair["public"]))
    with pytest.raises(Exception, match="CDI_SIGNING_KEY"):
        signing_key_from_env()


# --- recompute -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["used", "inconclusive", "reference", "directional", "verdict"])
def test_recompute_reproduces_the_test_and_the_verdict_exactly(documents, name: str) -> None:
    result = recompute_document(documents[name])
    assert result.ok, [(c.group, c.name, c.recorded, c.recomputed) for c in result.failures]
    groups = {c.group for c in result.checks}
    assert groups == {"scores", "features", "negative control", "direction check", "verdict"}
    names = {(c.group, c.name) for c in result.checks}
    assert ("verdict", "verdict") in names and ("features", "p_value") in names
    if name == "reference":
        assert ("scores", "p_value") in names and ("scores", "df") in names


def test_recompute_finds_a_changed_score_or_feature(documents) -> None:
    doc = copy.deepcopy(documents["used"])
    doc["images"][2]["score"] = 0.999
    failed = {(c.group, c.name) for c in recompute_document(doc).failures}
    assert ("scores", "statistic") in failed
    doc = copy.deepcopy(documents["reference"])
    doc["images"][0]["features"][0] += 0.5
    failed = {(c.group, c.name) for c in recompute_document(doc).failures}
    assert ("features", "per-image roles, folds and scores") in failed


# --- the command line, end to end on a tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory: pytest.TempPathFactory, key_pair) -> dict[str, Path]:
    import tiny_models

    from cdi.zoo import digits

    root = tmp_path_factory.mktemp("cli")
    model = tiny_models.build_pixel(root / "model")
    for folder, indices in (("published", range(12)), ("unpublished", range(100, 124))):
        (root / "data" / folder).mkdir(parents=True)
        for i in indices:
            digits.image(i, 16).save(root / "data" / folder / f"digit-{i:04d}.png")
    out = {"json": root / "report.json", "pdf": root / "report.pdf"}
    code = main(["audit", "--model", str(model), "--published", str(root / "data" / "published"),
                 "--unpublished", str(root / "data" / "unpublished"), "--features", "gradient-free",
                 "--protocol", "reference",
                 "--out", str(out["json"]), "--pdf", str(out["pdf"]), "--signing-key", str(key_pair["private"])])
    assert code == 0
    return out


def test_cli_audit_writes_a_valid_signed_report_and_its_pdf(cli_report, capsys) -> None:
    import jsonschema
    from pypdf import PdfReader

    doc = json.loads(cli_report["json"].read_text(encoding="utf-8"))
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    assert len(doc["images"]) == 36 and all(len(r["features"]) == 26 for r in doc["images"])
    assert doc["test"]["protocol"] == "reference" and doc["test"]["df"] > 0
    weights = doc["manifest"]["model"]["weight_sha256"]
    assert weights and all(len(h) == 64 for h in weights.values())
    text = PdfReader(str(cli_report["pdf"])).pages[0].extract_text()
    assert doc["integrity"]["digest"] in text and doc["integrity"]["signature"]["key_id"] in text


def test_cli_verify_and_recompute(cli_report, key_pair, tmp_path, capsys) -> None:
    path = str(cli_report["json"])
    assert main(["verify", path, "--public-key", str(key_pair["public"])]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["verify", path, "--public-key", str(key_pair["other"])]) == 1
    assert "not by the trusted key" in capsys.readouterr().err
    assert main(["recompute", path]) == 0
    out = capsys.readouterr().out
    assert "reproduced exactly" in out and "DIFF" not in out

    doc = json.loads(cli_report["json"].read_text(encoding="utf-8"))
    doc["images"][0]["score"] = 0.123
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    assert main(["verify", str(changed)]) == 1
    captured = capsys.readouterr()
    assert "NOT VERIFIED" in captured.out and "digest mismatch" in captured.err
    assert main(["recompute", str(changed)]) == 1
    assert "DIFF" in capsys.readouterr().out

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    assert main(["verify", str(garbage)]) == 2
    assert "is not JSON" in capsys.readouterr().err


# --- the service ---------------------------------------------------------------------------------


def test_service_renders_the_library_pdf_of_the_stored_report(documents) -> None:
    from app.pdf import render_report_pdf
    from cdi.report import render_pdf

    # Small sets: the PDF's subsampling curve has two sizes only, so rendering twice is cheap.
    small = synthetic_result("used", protocol="reference", features="gradient-free", seed=4, n_p=12, n_u=24)
    doc = json.loads(report_json(seal(build_report(small))))
    meta = {"id": "a1", "model": "m", "options": {}, "n_published": 12, "n_unpublished": 24}
    served = render_report_pdf(meta, {**doc, "service": {"audit_id": "a1"}})
    assert served == render_pdf(parse_report(doc))
    assert served.startswith(b"%PDF-")
    # A report stored before reports had a schema still gets a (one-page) PDF.
    assert b"Verdict: used" in render_report_pdf(meta, {"verdict": "used", "p_value": 0.001})


def test_worker_signs_the_stored_report_with_the_deployment_key(documents, key_pair) -> None:
    from cdi.report import load_private_key

    signed = seal_document(documents["used"], load_private_key(key_pair["private"]))
    assert signed["integrity"]["digest"] == documents["used"]["integrity"]["digest"]
    assert verify_document(signed, load_public_key(key_pair["public"])).ok


def test_the_report_package_imports_no_torch_and_no_plotting() -> None:
    code = ("import sys, cdi.report; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'reportlab', 'cryptography', 'cdi.audit') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
