import torch

from lisa_dist.sizing.memory import StorageTracker


def test_tracker_counts_live_storages_once_and_records_the_peak():
    tracker = StorageTracker()
    kept = torch.zeros(1000)
    tracker.track([kept, kept[:10]])
    assert tracker.live == 4000
    with tracker:
        a = torch.ones(2000)
        b = a * 2
        view = b[:5]
        del a, b
        assert tracker.live == 4000 + 8000
    assert tracker.peak == 4000 + 16000
    del view
    assert tracker.live == 4000


def test_tracker_follows_storage_resize():
    tracker = StorageTracker()
    with tracker:
        t = torch.empty(100)
        t.untyped_storage().resize_(0)
        assert tracker.live == 0
        t.untyped_storage().resize_(800)
        assert tracker.live == 800
    assert tracker.peak == 800
