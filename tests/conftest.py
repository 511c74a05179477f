from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


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
