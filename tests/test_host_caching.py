"""Re-runs in the host's real executor, with its output cache kept across queues (as a running
ComfyUI keeps it): Train Domain UNet trains again when the images in its folder changed and not
otherwise; Load Domain UNet loads again when its file was rewritten and not otherwise."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.support.graphs import loader, saved, train_graph
from tests.support.tiny_nodes import domain_images

CACHES = ["CLASSIC", "LRU"]  # 0.8.0's default cache, and --cache-lru 10


def input_folder(name):
    import folder_paths
    return os.path.join(folder_paths.get_input_directory(), name)


def later_mtime(path):
    """Move a file's modification time on by a second (whatever the file system's granularity)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def spy(monkeypatch, module, name):
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("cache", CACHES)
def test_training_runs_again_exactly_when_the_images_in_its_folder_changed(comfy, monkeypatch, cache):
    folder = domain_images(input_folder(f"rerun_{cache}"), sizes=((64, 64), (64, 96), (96, 64)))
    runs = spy(monkeypatch, comfy.pack("nodes.train_node"), "run_training")
    executor = comfy.executor(cache)
    prompt = train_graph(image_folder=f"rerun_{cache}", save_name=f"rerun_{cache}", steps=1, checkpoint_every=0, resume=False)

    def queue() -> int:
        comfy.run(prompt, executor=executor)
        return len(runs)

    assert queue() == 1
    assert queue() == 1, "nothing changed: the host's cached output"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(os.path.join(folder, "added.png"))
    assert queue() == 2, "an image added"
    assert queue() == 2
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(os.path.join(folder, "added.png"))
    later_mtime(os.path.join(folder, "added.png"))
    assert queue() == 3, "an image rewritten"
    os.remove(os.path.join(folder, "img_0.png"))
    assert queue() == 4, "an image removed"
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    assert queue() == 4, "a file that is not an image changes nothing"
    assert comfy.captured == {}  # the capture nodes were cached too


@pytest.mark.parametrize("cache", CACHES)
def test_load_domain_unet_loads_again_exactly_when_its_file_was_rewritten(comfy, monkeypatch, cache):
    domain_images(input_folder("reload_images"), sizes=((64, 64), (64, 96)))
    name = f"reload_{cache}"
    options = dict(mode="full", image_folder="reload_images", save_name=name, steps=1, checkpoint_every=0, resume=False)
    comfy.run(train_graph(seed=0, **options))
    loads = spy(monkeypatch, comfy.pack("nodes.loader_node"), "load_domain_unet")
    executor = comfy.executor(cache)
    prompt = {"ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
              "dom": loader(f"{name}.safetensors"),
              "cap": {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}}

    def queue():
        comfy.run(prompt, executor=executor)
        return len(loads), comfy.captured.get("dom")

    count, first = queue()
    assert count == 1 and first is not None
    assert queue() == (1, None), "file unchanged: the host's cached model"
    comfy.run(train_graph(seed=1, learning_rate=1e-2, **options))  # the same save_name, other weights
    count, second = queue()
    assert count == 2, "the file was rewritten"
    written = load_file(saved(f"{name}.safetensors"))
    loaded = second.model.diffusion_model.state_dict()
    before = first.model.diffusion_model.state_dict()
    assert all(torch.equal(loaded[k].float(), written[k].float()) for k in written)
    assert any(not torch.equal(before[k], loaded[k]) for k in written)
    assert queue() == (2, None)
