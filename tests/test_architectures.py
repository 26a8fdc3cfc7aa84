"""Full-size architectures for bench-speed, checked on the meta device (shapes only, nothing allocated)."""

import pytest
import torch

from diffscrub.adapters import adapter_for
from diffscrub.bench.architectures import ARCHITECTURES, build_pipeline, count_denoiser_params
from diffscrub.errors import ConfigError

# name: (family, latent channels, feature grid at the native resolution, feature width)
EXPECTED = {
    "sd15": ("sd", 4, (8, 8), 1280),
    "sdxl": ("sdxl", 4, (32, 32), 1280),
    "sd3-medium": ("sd3", 16, (64, 64), 1536),
    "flux-dev": ("flux", 16, (64, 64), 3072),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_size_architecture_runs_through_its_adapter(name):
    arch = ARCHITECTURES[name]
    # the published sizes: 859.5M (SD 1.5 UNet), 2567.5M (SDXL UNet), 2028.3M (SD3-medium), 11901.4M (Flux)
    assert count_denoiser_params(name) / 1e6 == pytest.approx(arch.denoiser_params_m, rel=1e-4)
    pipe = build_pipeline(name, device="meta")
    adapter = adapter_for(pipe)
    family, channels, grid, width = EXPECTED[name]
    assert adapter.family == family
    r = arch.native_resolution
    cond = adapter.encode_prompts([""], (r, r)).take(torch.zeros(1, dtype=torch.long))
    z = torch.empty(1, channels, r // 8, r // 8, device="meta")
    pred, feats = adapter.predict(adapter.denoiser, z, torch.tensor([500], device="meta"), cond, features=True)
    assert tuple(pred.shape) == (1, channels, r // 8, r // 8)
    assert tuple(feats.grid) == grid and feats.vectors.shape[-1] == width


def test_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="sdxl"):
        build_pipeline("sd2", device="meta")
