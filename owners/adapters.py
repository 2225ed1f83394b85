"""The exact inverse of a key as a :class:`models.keyed.BlockAdapter` setting (owner side only).

Only someone holding the key can compute this. Tests use it to show the adapter can undo a key
exactly; the leakage measurement uses it as ground truth; an owner may start its private adapter
from it in the federated mode.
"""
from __future__ import annotations

import numpy as np
import torch

from owners.cipher import CHANNEL_ORDERS, BlockSchedule


def inverse_orientation(code: int) -> int:
    """The orientation code that undoes ``transform_block(., code)``: a quarter-turn rotation is
    undone by the opposite turn; rotate-then-flip is its own inverse."""
    return code if code >= 4 else (4 - code) % 4


def inverse_setting(schedule: BlockSchedule, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(place, orientation, colour) for ``BlockAdapter.set_exact``: encrypted block i goes back to
    plain position source[i], is re-oriented, un-negated (a sign flip in [-1, 1]) and its channels
    unshuffled."""
    n = len(schedule.source)
    place = torch.tensor(np.array(schedule.source), dtype=torch.long)
    orientation = torch.tensor([inverse_orientation(int(t)) for t in schedule.transform], dtype=torch.long)
    colour = torch.zeros(n, channels, channels)
    for i in range(n):
        sign = -1.0 if schedule.negate[i] else 1.0
        if schedule.channel_order is None:
            colour[i] = sign * torch.eye(channels)
        else:  # encrypted channel c holds plain channel order[c]
            for c, plain_channel in enumerate(CHANNEL_ORDERS[int(schedule.channel_order[i])]):
                colour[i, plain_channel, c] = sign
    return place, orientation, colour
