"""LoRAs of the families added after the LoRA reader (Z-Image, FLUX.2) are named as theirs, not as SD3's or
FLUX.1's, and refused on their models before the queue (no LoRA is applied to them yet)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_sd_server.engine.errors import JobError
from mlx_sd_server.engine.families.spec import Capabilities
from mlx_sd_server.job import build_job
from mlx_sd_server.lora.formats import lora_family


def peft(layer: str, width: int, rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"transformer.{layer}.lora_A.weight": (rank, width), f"transformer.{layer}.lora_B.weight": (width, rank)}


CASES = {
    "zimage (main layers)": peft("layers.0.attention.to_q", 3840),
    "zimage (refiners only)": {
        **peft("noise_refiner.1.feed_forward.w1", 3840),
        **peft("context_refiner.0.attention.to_k", 3840),
    },
    "flux2 (single blocks, klein-4B's width which is FLUX.1's)": peft(
        "single_transformer_blocks.3.attn.to_qkv_mlp_proj", 3072
    ),
    "flux2 (double-block feed-forward)": {
        **peft("transformer_blocks.0.attn.to_q", 3072),
        **peft("transformer_blocks.0.ff.linear_in", 3072),
    },
    "flux (FLUX.1 double blocks stay FLUX.1's)": peft("transformer_blocks.0.attn.to_q", 3072),
    "sd3 (joint blocks stay SD3's)": peft("transformer_blocks.0.attn.add_q_proj", 1536),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_family_of_a_dit_lora(tmp_path, case):
    path = tmp_path / "lora.safetensors"
    save_file({key: np.zeros(shape, np.float32) for key, shape in CASES[case].items()}, str(path))
    assert lora_family(path) == case.split()[0]


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_a_lora_on_a_family_without_loras_is_refused_before_the_queue(family):
    with pytest.raises(JobError) as caught:
        build_job(
            {"prompt": f"<lora:style:0.8> a cat"},
            capabilities=Capabilities(family=family, lora=False),
            lora_family=lambda name: family,
        )
    assert caught.value.status == 400 and caught.value.param == "prompt"
