"""Shared fixtures: tiny real models of the real classes, built offline once per session."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from flmm.build import TINY_LLAVA_VARIANTS
from flmm.tiny_llava import write_tiny_llava
from flmm.tiny_lmms import write_tiny_lmm

CORPUS = [
    "the red circle on the left",
    "a small blue square below the big green triangle",
    "the yellow star above the purple object",
    "Please briefly describe this image.",
    "Please give me a description of the image.",
    "What colour is the shape on the right?",
] * 10


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA (left padding) saved with save_pretrained, as a llava-hf checkpoint is."""
    config = TINY_LLAVA_VARIANTS["tiny"]
    return write_tiny_llava(config, CORPUS, tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_llava_right_dir(tmp_path_factory):
    """The same tiny LLaVA with a right-padding tokenizer."""
    config = dataclasses.replace(TINY_LLAVA_VARIANTS["tiny"], padding_side="right")
    return write_tiny_llava(config, CORPUS, tmp_path_factory.mktemp("tiny_llava_right"))


@pytest.fixture(scope="session")
def tiny_lmm_dir(tmp_path_factory, tiny_llava_dir):
    """model_type → a tiny random checkpoint of that family (``flmm.tiny_lmms``), written on
    first use; ``llava`` is ``tiny_llava_dir``."""
    written = {"llava": tiny_llava_dir}

    def get(model_type: str):
        if model_type not in written:
            out = tmp_path_factory.mktemp(f"tiny_{model_type}")
            written[model_type] = write_tiny_lmm(model_type, CORPUS, out)
        return written[model_type]

    return get


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Every test leaves torch's intra-op thread count as it found it: one that lowers it for
    itself (``one_thread``) must restore it, or the tests after it run slower or differently."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    assert after == before, f"torch threads {before} -> {after}: set_num_threads not restored"


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny tensors: more threads only add latency on shared
    cores), restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session (2 real cores here; 4 logical CPUs so that a
    model actor, read tasks and decode tasks can run side by side). Started after the session's
    S3 server, so that its workers inherit the variables that point S3 at it."""
    import ray

    if ray.is_initialized():  # another fixture already started it
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API on loopback (moto in server mode) for the whole session; the standard AWS
    environment variables point every pyarrow S3 filesystem of this process at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new empty bucket on the session's S3 server: its name (``s3://<name>/...``)."""
    import re

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return name
