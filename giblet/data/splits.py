"""Train / validation / test as contiguous TR blocks separated by gaps.

A gap of at least ``lookback + HRF length`` seconds means no stimulus window of
one split reaches into another and no response to one split's stimulus lasts
into the next, so nothing of the held-out TRs leaks into training.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

from giblet.errors import DataError

SPLITS = ("train", "val", "test")


def split_blocks(
    n_trs: int,
    tr_s: float,
    val_fraction: float,
    test_fraction: float,
    gap_s: float,
    min_gap_s: float = 0.0,
    source: str = "store",
) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """``{"train": (0, a), "val": (a + gap, b), "test": (b + gap, n_trs)}`` as [start, stop) TR indices, and the gap in TRs.

    Test is the last block, validation sits between train and test. A gap
    shorter than ``min_gap_s`` (the lookback plus the HRF length) is refused.
    """
    if gap_s < max(min_gap_s, 0.0):
        raise DataError(
            source,
            f"a gap of {gap_s:g} s between the splits",
            expected=f"at least window.lookback_s + window.hrf_length_s = {min_gap_s:g} s so no window straddles two splits",
        )
    gap_trs = int(math.ceil(gap_s / tr_s - 1e-9))
    n_test = int(round(test_fraction * n_trs))
    n_val = int(round(val_fraction * n_trs))
    n_gaps = (1 if n_val else 0) + 1
    n_train = n_trs - n_test - n_val - n_gaps * gap_trs
    if n_test < 1 or n_train < 1:
        raise DataError(
            source,
            f"{n_trs} TRs cannot hold train, {n_val} val and {n_test} test TRs with gaps of {gap_trs} TRs ({gap_s:g} s)",
            expected="more TRs, or smaller split fractions, window.lookback_s or window.hrf_length_s",
        )
    train = (0, n_train)
    val = (n_train + gap_trs, n_train + gap_trs + n_val) if n_val else (n_train, n_train)
    test_start = (val[1] + gap_trs) if n_val else (n_train + gap_trs)
    test = (test_start, test_start + n_test)
    assert test[1] == n_trs
    return {"train": train, "val": val, "test": test}, gap_trs
