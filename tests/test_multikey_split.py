"""The multi-key experiment's data split: every image to exactly one owner, IID or Dirichlet."""
import random
from pathlib import Path

import pytest

from benchmarks.multikey import split_owners


def files(classes=5, per_class=100):
    return {f"c{c}": [Path(f"c{c}/{i}.jpg") for i in range(per_class)] for c in range(classes)}


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_every_image_goes_to_exactly_one_owner(partition):
    shares = split_owners(files(), 4, partition, 0.5, random.Random(0))
    for cls, paths in files().items():
        given = [p for share in shares for p in share[cls]]
        assert sorted(given) == sorted(paths)


def test_iid_is_balanced_and_dirichlet_is_skewed():
    iid = split_owners(files(), 4, "iid", 0.5, random.Random(0))
    assert {len(share[c]) for share in iid for c in share} == {25}
    skewed = split_owners(files(), 4, "dirichlet", 0.1, random.Random(0))
    counts = [len(share[c]) for share in skewed for c in share]
    assert max(counts) - min(counts) > 50
    with pytest.raises(ValueError, match="unknown partition"):
        split_owners(files(), 2, "round-robin", 0.5, random.Random(0))
