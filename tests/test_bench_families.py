"""The full-size models of the GPU benchmarks (bench/families.py) are the families they are named after:
built on the meta device (shapes only), each is detected by the host as the released checkpoints are,
with the released model's size, and its empty latent has the family's shape."""
import pytest

# parameters of the released diffusion models, in billions (their model cards)
SIZES = {"sd35m": 2.5, "flux_dev": 12, "zimage": 6, "flux2_dev": 32, "qwen_image": 20, "wan22_5b": 5}


@pytest.fixture(scope="module")
def families(comfy):
    from bench import families
    return families


def test_every_benchmark_family_has_a_released_size(families):
    assert set(families.FAMILIES) == set(SIZES)


@pytest.mark.parametrize("name", list(SIZES))
def test_the_host_detects_the_family_at_its_released_size(families, name):
    import comfy.model_detection

    spec = families.FAMILIES[name]
    sd = families.random_state_dict(name, 0, "meta")
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected).__name__ == spec["cls"]
    def same(a, b):
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b

    read = {k: v for k, v in detected.unet_config.items() if k in spec["config"]}  # what the host reads of the file
    assert read and all(same(v, spec["config"][k]) for k, v in read.items()), read
    billions = sum(v.numel() for v in sd.values()) / 1e9
    assert abs(billions - SIZES[name]) / SIZES[name] < 0.05, billions


@pytest.mark.parametrize("name", ["flux2_dev", "qwen_image", "wan22_5b"])
def test_the_file_stores_matrices_as_the_released_files_do(families, name):
    spec = families.FAMILIES[name]
    sd = families.random_state_dict(name, 0, "cpu", families.tiny_config(name))
    assert {v.dtype for v in sd.values() if v.ndim > 1} == {spec.get("weights", spec["dtype"])}  # fp8 where released so
    assert {v.dtype for v in sd.values() if v.ndim == 1 and v.is_floating_point()} == {spec["dtype"]}


def test_the_empty_latents_have_the_families_shapes(families):
    assert families.latent_shape("flux2_dev", 2) == (2, 128, 64, 64)  # 16x, 128 channels
    assert families.latent_shape("qwen_image", 1) == (1, 16, 128, 128)
    assert families.latent_shape("wan22_5b", 1) == (1, 48, 13, 30, 52)  # 832 x 480, 49 frames: 4x in time
    assert families.latent_shape("wan22_5b", 1, quick=True) == (1, 48, 2, 4, 4)
