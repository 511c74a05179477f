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
    }
