"""What the verdict reads: the declarations, their union, and an audit that extracts only that."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from cdi import reads as cdi_reads
from cdi.audit import AuditOptions, audit
from cdi.features.layout import FEATURE_NAMES, FeatureSet
from cdi.reads import DIRECTION_FEATURES, VERDICT_READS, Reads, columns_read, features_read

LOW_T_ML = ("ml_t000", "ml_t100", "ml_t200", "ml_t300")


def test_the_default_audit_reads_six_features() -> None:
    assert features_read(AuditOptions()) == ("dl", "pia", *LOW_T_ML)
    assert set(DIRECTION_FEATURES) <= set(features_read(AuditOptions()))
    assert [FEATURE_NAMES[c] for c in cdi_reads.tested_columns(AuditOptions())] == ["dl", "pia", *LOW_T_ML]


@pytest.mark.parametrize("protocol", ["reference", "crossfit"])
def test_scorer_protocols_read_every_feature_of_the_set(protocol: str) -> None:
    assert features_read(AuditOptions(protocol=protocol)) == FEATURE_NAMES
    gradient_free = AuditOptions(protocol=protocol, features="gradient-free")  # type: ignore[arg-type]
    assert columns_read(gradient_free) == cdi_reads.tested_columns(gradient_free) == FeatureSet.GRADIENT_FREE.columns


def test_whole_sets_are_extracted_whatever_the_verdict_reads() -> None:
    everything = AuditOptions(features="all")  # type: ignore[arg-type]
    assert features_read(everything) == FEATURE_NAMES
    # The test still reads only its candidates: the same test as the default audit's.
    assert cdi_reads.tested_columns(everything) == cdi_reads.tested_columns(AuditOptions())
    assert everything.protocol_options == AuditOptions().protocol_options


def test_a_new_reader_is_one_entry_and_the_extraction_follows() -> None:
    calibration = Reads("difficulty calibration", ("ml_t500", "ml_t900"))
    reads = (*VERDICT_READS, calibration)
    assert features_read(AuditOptions(), reads) == ("dl", "pia", *LOW_T_ML, "ml_t500", "ml_t900")
    # A reader of one protocol only adds nothing under another.
    only_crossfit = Reads("crossfit calibration", ("gm_t000",), protocols=("crossfit",))
    assert "gm_t000" not in features_read(AuditOptions(), (*VERDICT_READS, only_crossfit))


def test_a_declaration_names_real_features() -> None:
    with pytest.raises(ValueError, match="unknown features: ml_t050"):
        Reads("typo", ("ml_t050",))
    with pytest.raises(ValueError, match="test declarations"):
        columns_read(AuditOptions(), tuple(r for r in VERDICT_READS if r.reader != "directional test"))


def test_the_declarations_load_without_numpy_or_torch() -> None:
    code = ("import sys, cdi.reads; from cdi.reads import features_read; "
            "print(sorted(m for m in ('numpy', 'torch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_feature_sets_and_precisions_are_refused() -> None:
    from cdi.errors import InputError

    with pytest.raises(InputError, match="unknown feature set 'some'"):
        AuditOptions(features="some")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="precision must be one of"):
        AuditOptions(precision="fp8")
    with pytest.raises(InputError, match="batch_size"):
        AuditOptions(batch_size=0)
    assert AuditOptions(batch_size=None).batch_size is None


# --- extraction by need, on the shipped memorising model ---------------------------------------


class CountingStore:
    """A feature store in memory that keeps partial rows as the service's does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], np.ndarray] = {}

    def load(self, key, sha256s):
        return {s: self.rows[(key, s)].copy() for s in sha256s if (key, s) in self.rows}

    def save(self, key, rows) -> None:
        for s, v in rows.items():
            old = self.rows.get((key, s))
            v = np.asarray(v, dtype=np.float64)
            self.rows[(key, s)] = v.copy() if old is None else np.where(np.isnan(old), v, old)


@pytest.fixture(scope="module")
def digit_sets():
    import io

    from cdi import zoo
    from cdi.images import ImageFile
    from cdi.zoo import digits

    model = zoo.get("digits-memorised")

    def png(i: int) -> ImageFile:
        buf = io.BytesIO()
        digits.image(i, model.image_size).save(buf, format="PNG")
        return ImageFile(zoo.ZooModel.file_name(i), buf.getvalue())

    return [png(i) for i in model.members[:10]], [png(i) for i in model.held_out[:20]]


def test_the_default_audit_gives_the_all_features_verdict_for_a_fifth_of_the_passes(digit_sets) -> None:
    p, u = digit_sets
    store = CountingStore()
    default = audit(p, u, "digits-memorised", options=AuditOptions(seed=3), feature_store=store)
    n = len(p) + len(u)
    read = default.options.columns
    # 9 DL draws, PIA's 2 calls and ML at 4 timesteps; no gradient.
    assert (default.forward_passes, default.backward_passes) == (15 * n, 0)
    for im in default.images_p + default.images_u:
        assert np.isfinite(im.features[read]).all()
        assert np.isnan(np.delete(im.features, read)).all()

    # Without the store: all 26 computed from scratch, the same verdict from the same bits.
    fresh = audit(p, u, "digits-memorised", options=AuditOptions(seed=3, features="all"))  # type: ignore[arg-type]
    assert (fresh.outcome, fresh.p_value) == (default.outcome, default.p_value)
    for a, b in zip(default.images_p + default.images_u, fresh.images_p + fresh.images_u, strict=True):
        assert np.array_equal(a.features[read], b.features[read])

    # With the store: a later audit of all 26 computes only the 20 features the first left out,
    # skipping the 15 passes per image of the stored six but for one: PIA's ε̂(z0, 0), which in
    # a whole run also serves as SecMI's first step, is made again for SecMI.
    full = audit(p, u, "digits-memorised", options=AuditOptions(seed=3, features="all"),  # type: ignore[arg-type]
                 feature_store=store)
    assert full.cached_images == 0
    assert full.forward_passes == fresh.forward_passes - 14 * n
    assert full.backward_passes == fresh.backward_passes
    assert (full.outcome, full.p_value) == (default.outcome, default.p_value)
    for a, b in zip(full.images_p + full.images_u, fresh.images_p + fresh.images_u, strict=True):
        assert np.array_equal(a.features[read], b.features[read])
        assert np.isfinite(a.features).all()

    # And now every audit of these images finds all it needs stored.
    again = audit(p, u, "digits-memorised", options=replace(default.options), feature_store=store)
    assert (again.cached_images, again.forward_passes, again.backward_passes) == (n, 0, 0)
    assert (again.outcome, again.p_value) == (default.outcome, default.p_value)
