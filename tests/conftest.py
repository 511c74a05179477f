from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def _own_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``cdi audit`` and ``cdi.run_audit`` cache features in the user's cache folder: the tests
    use a folder of their own (and so do the processes they start), never the user's."""
    before = os.environ.get("CDI_CACHE_DIR")
    os.environ["CDI_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if before is None:
        os.environ.pop("CDI_CACHE_DIR", None)
    else:
        os.environ["CDI_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random-weight model directory per supported family (and VQ, v-prediction)."""
    import tiny_models as tm

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "pixel": tm.build_pixel(root / "pixel"),
        "pixel-class": tm.build_pixel(root / "pixel-class", num_classes=10),
        "latent-kl": tm.build_latent(root / "latent-kl"),
        "latent-vq": tm.build_latent(root / "latent-vq", vq=True),
        "dit": tm.build_dit(root / "dit"),
        "stable-diffusion": tm.build_stable_diffusion(root / "sd"),
        "stable-diffusion-v": tm.build_stable_diffusion(root / "sd-v", prediction_type="v_prediction"),
        "sdxl": tm.build_sdxl(root / "sdxl"),
        "sd3": tm.build_sd3(root / "sd3"),
        "flux": tm.build_flux(root / "flux"),
    }


@pytest.fixture(scope="session")
def memorised_features():
    """All 26 features of 100 members and 300 held-out digits of the memorising shipped model."""
    import numpy as np

    from cdi import zoo
    from cdi.features import FeatureExtractor
    from cdi.features.extractor import ExtractionInput
    from cdi.images import to_model_array
    from cdi.models import load_model
    from cdi.zoo import digits

    model = zoo.get("digits-memorised")
    extractor = FeatureExtractor(load_model(model.name), seed=0, batch_size=100)

    def features(indices):
        return extractor.extract([
            ExtractionInput(f"digit-{i}", to_model_array(digits.image(i, model.image_size), model.image_size, 1))
            for i in indices
        ])

    return np.asarray(features(model.members[:100])), np.asarray(features(model.held_out[:300]))
