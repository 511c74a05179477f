"""Audits on the shipped, memorising model: the verdict in both directions, and its guards."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cdi import zoo
from cdi.audit import AuditOptions, audit
from cdi.cli import main
from cdi.errors import InputError
from cdi.images import ImageFile
from cdi.report import result_to_dict
from cdi.zoo import digits

MODEL = "digits-memorised"
N = 50


class MemoryStore:
    """A feature store in memory: the audits of this module share their features."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], np.ndarray] = {}
        self.saves = 0

    def load(self, key: str, sha256s):
        return {s: self.rows[(key, s)] for s in sha256s if (key, s) in self.rows}

    def save(self, key: str, rows) -> None:
        self.saves += 1
        for s, v in rows.items():
            self.rows[(key, s)] = np.array(v)


@pytest.fixture(scope="module")
def store() -> MemoryStore:
    return MemoryStore()


def png(index: int, size: int, transform=None) -> ImageFile:
    img = digits.image(index, size)
    if transform is not None:
        img = transform(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ImageFile(zoo.ZooModel.file_name(index), buf.getvalue())


@pytest.fixture(scope="module")
def model() -> zoo.ZooModel:
    return zoo.get(MODEL)


def test_members_against_held_out_is_used(model, store):
    published = [png(i, model.image_size) for i in model.members[:N]]
    unpublished = [png(i, model.image_size) for i in model.held_out[:N]]
    stages = []
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store,
                   progress=lambda p: stages.append(p.stage))
    assert result.outcome == "used", result.verdict.reason
    assert result.p_value < 0.01
    assert result.test.direction == "P>U"
    assert {"validating", "extracting", "scoring", "testing"} <= set(stages)
    report = result_to_dict(result)
    assert report["verdict"] == "used" and report["p_value"] == result.p_value
    assert len(report["images"]) == 2 * N and all(len(r["features"]) == 26 for r in report["images"])


def null_sets(model: zoo.ZooModel) -> tuple[list[int], list[int]]:
    """Two disjoint random halves of the first 2N held-out digits: exchangeable sets.

    Random, not contiguous: the held-out list is in the data set's order, which follows its
    writers, so two contiguous blocks differ in handwriting, a real difference between the
    sets that a powerful test detects (the null hypothesis needs P and U from one source).
    """
    order = np.random.default_rng(0).permutation(2 * N)
    pool = model.held_out[: 2 * N]
    return [pool[i] for i in order[:N]], [pool[i] for i in order[N:]]


def test_held_out_against_held_out_is_not_detected(model, store):
    p_idx, u_idx = null_sets(model)
    published = [png(i, model.image_size) for i in p_idx]
    unpublished = [png(i, model.image_size) for i in u_idx]
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store)
    assert result.outcome == "not_detected", result.verdict.reason
    assert result.p_value >= 0.01
    # The first N held-out digits' features came from the store: only the others were computed.
    assert result.cached_images == N
    assert result.forward_passes > 0


def test_shifted_unpublished_set_is_inconclusive(model, store):
    def brighten(img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(1.0))

    published = [png(i, model.image_size) for i in model.members[:N]]
    unpublished = [png(i, model.image_size, brighten) for i in model.held_out[:N]]
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store)
    assert result.verdict.distribution_shift
    assert result.outcome == "inconclusive", result.verdict.reason


def test_swapped_sets_are_never_used(model, store):
    # P holds images the model never saw and U its training images: P is *less* member-like.
    # The scorer learns whatever separates the sets; the direction check refuses "used".
    published = [png(i, model.image_size) for i in model.held_out[:N]]
    unpublished = [png(i, model.image_size) for i in model.members[:N]]
    for protocol in ("directional", "reference", "crossfit"):
        result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3, protocol=protocol),
                       feature_store=store)
        assert result.outcome == "inconclusive", result.verdict.reason
        assert result.verdict.reversal_failed


def test_duplicates_across_sets_are_reported_and_excluded(model, store):
    published = [png(i, model.image_size) for i in model.members[:N]]
    unpublished = [png(i, model.image_size) for i in model.held_out[:N]]
    shared = published[0]
    unpublished[0] = ImageFile("copy.png", shared.data)
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store)
    assert result.duplicates.has_between_set
    assert 0 in result.exclusion.p and 0 in result.exclusion.u
    names = {im.name for im in result.images_p + result.images_u}
    assert shared.name not in names and "copy.png" not in names


def test_exclusions_that_leave_too_few_images_are_named(model):
    # 10 + 21 images is a valid cross-fitted audit; U[0] is P[0] saved as JPEG and U[5] repeats
    # U[4]'s file, so P loses one image (10 → 9) and U two (21 → 19): both below their minimum.
    published = [png(i, model.image_size) for i in model.members[:10]]
    unpublished = [png(i, model.image_size) for i in model.held_out[:21]]
    buf = io.BytesIO()
    digits.image(model.members[0], model.image_size).save(buf, format="JPEG", quality=80)
    unpublished[0] = ImageFile("copy-of-first.jpg", buf.getvalue())
    unpublished[5] = ImageFile("again.png", unpublished[4].data)
    with pytest.raises(InputError) as caught:
        audit(published, unpublished, MODEL, options=AuditOptions(seed=3))
    message = str(caught.value)
    assert "1 published and 2 unpublished image(s) were excluded" in message
    assert "P = 9 of 10" in message and "U = 19 of 21" in message
    assert published[0].name in message and "copy-of-first.jpg" in message and "across P and U" in message
    assert "again.png" in message and f"kept {unpublished[4].name}" in message


def test_too_small_sets_fail_before_any_model_is_read(tmp_path):
    few = [png(i, 16) for i in range(3)]
    with pytest.raises(InputError, match="images"):
        audit(few, few, str(tmp_path / "no-such-model"))


def test_bad_image_is_named_before_extraction(model):
    published = [png(i, model.image_size) for i in model.members[:12]]
    unpublished = [png(i, model.image_size) for i in model.held_out[:24]]
    published[3] = ImageFile("broken.png", published[3].data[:40])
    with pytest.raises(InputError, match=r"broken\.png"):
        audit(published, unpublished, MODEL)


def test_cli_audit_writes_the_report(model, tmp_path, capsys):
    published, unpublished = model.export(tmp_path / "demo", members=20, held_out=20)
    out = tmp_path / "report.json"
    code = main([
        "audit", "--model", MODEL, "--published", str(published[0].parent),
        "--unpublished", str(unpublished[0].parent), "--protocol", "reference", "--out", str(out),
        "--features", "gradient-free",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["verdict"] in printed.lower().replace(" ", "_")
    assert report["test"]["protocol"] == "reference"
    assert report["feature_layout"]["used"] == ["dl", "secmi_stat", "pia", "pian"] + [
        f"ml_t{t:03d}" for t in range(0, 1000, 100)
    ]


def test_cli_reports_input_errors(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "u").mkdir()
    code = main(["audit", "--model", MODEL, "--published", str(tmp_path / "p"),
                 "--unpublished", str(tmp_path / "u")])
    assert code == 2
    assert "no image files" in capsys.readouterr().err


def test_demo_export_writes_both_sets(tmp_path: Path, capsys):
    assert main(["demo", "--export", str(tmp_path), "--members", "5", "--held-out", "7"]) == 0
    assert len(list((tmp_path / "published").glob("*.png"))) == 5
    assert len(list((tmp_path / "unpublished").glob("*.png"))) == 7
    assert "cdi audit" in capsys.readouterr().out


def test_cli_audit_keeps_the_report_when_stdout_is_closed(model, tmp_path, monkeypatch):
    """`cdi audit … | head -1`: the pipe closes before the summary; the report is on disk."""

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    published, unpublished = model.export(tmp_path / "demo", members=20, held_out=20)
    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main([
        "audit", "--model", MODEL, "--published", str(published[0].parent),
        "--unpublished", str(unpublished[0].parent), "--protocol", "reference", "--out", str(out),
        "--features", "gradient-free",
    ])
    assert code == 141  # quietly, as a shell's `| head` expects
    assert json.loads(out.read_text())["verdict"] in {"used", "not_detected", "inconclusive"}


def test_overwhelming_evidence_is_resolved_below_one_in_a_million_and_recomputes(model, store):
    # 75 members against 75 held-out digits: the evidence is far beyond any fixed permutation
    # count; the sequential p-value draws a million permutations and says so.
    from cdi.report import parse_report, recompute_report

    n = 75
    # Both sets spread over the whole data set (its order follows its writers): U drawn at
    # random from the held-out digits, as P's members are from the pool.
    u_idx = sorted(np.random.default_rng(1).choice(model.held_out, n, replace=False).tolist())
    published = [png(i, model.image_size) for i in model.members[:n]]
    unpublished = [png(i, model.image_size) for i in u_idx]
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store)
    assert result.outcome == "used", result.verdict.reason
    assert result.test.p_value <= 1e-6
    assert result.test.n_permutations == result.options.max_permutations
    # The calibrated test stops where its verdict is settled (⌈h / α⌉ draws): the verdict's
    # p-value, the larger of the two, is its floor.
    calibrated = result.calibrated_test
    assert calibrated is not None and calibrated.n_permutations == 10_000
    assert result.p_value == max(result.test.p_value, calibrated.p_value) == 1 / 10_001
    document = result_to_dict(result)
    assert document["p_value"] == result.p_value and document["test"]["p_value_floor"] == result.test.p_value
    assert document["test"]["selected_feature"]
    check = recompute_report(parse_report(document))
    assert check.ok, [(c.group, c.name, c.recorded, c.recomputed) for c in check.failures]


def test_not_detected_report_says_how_many_images_would_detect_the_effect(model, store):
    p_idx, u_idx = null_sets(model)
    published = [png(i, model.image_size) for i in p_idx]
    unpublished = [png(i, model.image_size) for i in u_idx]
    result = audit(published, unpublished, MODEL, options=AuditOptions(seed=3), feature_store=store)
    assert result.outcome == "not_detected" and result.plan is not None
    planning = result_to_dict(result)["planning"]
    assert planning["power"] == 0.9 and planning["summary"].startswith(("About", "The pilot shows no"))
    # Held-out against held-out: no real effect, so the planned size is large or unreachable.
    assert planning["n_per_set"] is None or planning["n_per_set"] > N


def test_features_extracted_in_shards_are_the_audits(model):
    """extract_shard over two shards, into one store: the audit then computes nothing and
    gives the p-value and features of an audit that computed everything itself."""
    from cdi.audit import extract_shard

    published = [png(i, model.image_size) for i in model.members[:10]]
    unpublished = [png(i, model.image_size) for i in model.held_out[:20]]
    files = published + unpublished
    options = AuditOptions(seed=5, batch_size=4)
    sharded = MemoryStore()
    first = extract_shard(files[:13], MODEL, sharded, options=options)
    second = extract_shard(files[13:], MODEL, sharded, options=options)
    assert (first.computed, second.computed, first.cached, second.cached) == (13, 17, 0, 0)
    assert extract_shard(files[:13], MODEL, sharded, options=options).computed == 0  # a redelivered shard
    result = audit(published, unpublished, MODEL, options=options, feature_store=sharded)
    assert result.forward_passes == 0 and result.cached_images == 30
    assert first.forward_passes + second.forward_passes > 0
    whole = audit(published, unpublished, MODEL, options=options, feature_store=MemoryStore())
    assert whole.forward_passes == first.forward_passes + second.forward_passes
    assert result.outcome == whole.outcome
    assert result.p_value == pytest.approx(whole.p_value, rel=1e-6, abs=1e-12)
    # Equal to float32 rounding: other batches sum in another order (the same as a resumed run);
    # a small feature that is a difference of larger ones (SecMI) keeps ~1e-5 of it.
    np.testing.assert_allclose(np.array([im.features for im in result.images_p + result.images_u]),
                               np.array([im.features for im in whole.images_p + whole.images_u]), rtol=1e-4)
    assert result.model["source"] == MODEL  # a shipped model is named, not located


def test_extract_shard_names_every_unreadable_image(model):
    from cdi.audit import extract_shard
    from cdi.errors import InputError

    files = [png(i, model.image_size) for i in model.members[:3]]
    files += [ImageFile("broken-1.png", b"not an image"), ImageFile("broken-2.png", b"\x89PNG\r\n")]
    with pytest.raises(InputError, match="2 image") as err:
        extract_shard(files, MODEL, MemoryStore())
    assert len(err.value.image_errors) == 2


def test_a_second_cli_audit_of_the_same_images_computes_no_feature(model, tmp_path, capsys, monkeypatch):
    """Without --out the report goes to ./report.json (then report-2.json: never overwritten);
    the local feature cache makes the repeat audit free, and says so; --no-cache bypasses it."""
    published, unpublished = model.export(tmp_path / "demo", members=10, held_out=20)
    monkeypatch.setenv("CDI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["audit", "--model", MODEL, "--published", str(published[0].parent),
            "--unpublished", str(unpublished[0].parent), "--protocol", "reference", "--features", "gradient-free"]

    def run(*extra: str) -> tuple[str, int, int]:
        assert main([*argv, *extra]) == 0
        captured = capsys.readouterr()
        m = re.search(r"features +(\d+) forward passes; (\d+) image\(s\) read from the feature cache", captured.out)
        assert m, captured.out
        return captured.err, int(m.group(1)), int(m.group(2))

    err, forward, cached = run()
    assert forward > 0 and cached == 0
    assert "report.json" in err and (tmp_path / "report.json").is_file()
    err, forward, cached = run()
    assert (forward, cached) == (0, 30)
    assert (tmp_path / "report-2.json").is_file()
    first = json.loads((tmp_path / "report.json").read_text())
    second = json.loads((tmp_path / "report-2.json").read_text())
    assert (second["verdict"], second["p_value"]) == (first["verdict"], first["p_value"])
    _, forward, cached = run("--no-cache", "--out", str(tmp_path / "fresh.json"))
    assert forward > 0 and cached == 0
