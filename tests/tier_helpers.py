"""What the two-tier tests (tests/memd/test_tiers.py, test_host_compute.py) share: a store the reader can read."""
from types import SimpleNamespace

from services.memd.store import Segment


def fake_store(path, segments: dict) -> SimpleNamespace:
    """What the reader needs of a store: the files, each expert's segments, nothing to convert."""
    return SimpleNamespace(files=[str(path)], segments=segments, prepare=lambda key: None, ready=lambda key: True)


def contiguous(path, keys, nbytes: int) -> dict:
    """Expert k: ``nbytes`` from file offset k * nbytes into slot offset 0."""
    return {key: [Segment(str(path), i * nbytes, nbytes, 0)] for i, key in enumerate(keys)}
