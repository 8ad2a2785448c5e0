"""The worker's recency hints (``leased_uses``: leased experts used since its last acquire) keep the newest uses when
there are more than MAX_LEASED_USES of them: the oldest are dropped, the order is kept."""
import numpy as np

from services.worker import memd_client
from services.worker.memd_client import MemdClient


def test_leased_uses_keeps_the_newest_hints(tmp_path, monkeypatch):
    monkeypatch.setattr(memd_client, "MAX_LEASED_USES", 6)
    client = MemdClient(f"ipc://{tmp_path}/rpc.sock", f"ipc://{tmp_path}/trace.sock", timeout_s=1, leases=True)
    try:
        client._control = np.zeros(1, np.int64)  # leasing, epoch 0: leased layers need no message
        client.leases = {(layer, e): layer * 8 + e for layer in range(4) for e in range(8)}
        for layer in range(4):
            assert client.acquire(layer, [1, 2], [], []) == [layer * 8 + 1, layer * 8 + 2] and client.last_leased
        assert list(client._leased_uses) == [[1, 1], [1, 2], [2, 1], [2, 2], [3, 1], [3, 2]]
    finally:
        client.close()
