"""De-duplication of a run's contacts by 64-bit email fingerprints (pipeline.MappedChunk.fps), 8 bytes a profile.

The only numpy user on the mapping path: the exporting process imports it, worker processes do not.
"""

from __future__ import annotations

from array import array

import numpy as np

RUN_CAP = 1 << 20  # fingerprints per sorted run at most: a merge never copies more than 8 MB
MERGE_FACTOR = 4


class Deduper:
    """Remembers 64-bit fingerprints in sorted uint64 runs (8 bytes each, plus a transient copy while merging).

    Runs are merged like a counter in base MERGE_FACTOR (a run is merged into the one before it while that one is at
    most MERGE_FACTOR times its size) up to RUN_CAP fingerprints, so memory grows by 8 bytes a profile with a
    bounded transient (merging ever larger runs would briefly need 16 to 24 bytes a profile); beyond RUN_CAP a
    lookup searches one more run per million profiles, which stays cheap next to the rest of a row's work. Every
    lookup searches every run, so fewer runs (base 4 rather than 2: at most 4 runs below RUN_CAP instead of 6) cost
    less than the extra copying: 0.36 -> 0.27 us a profile at 1M, 0.57 -> 0.51 at 5M.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored fingerprints."""
        return sum(run.nbytes for run in self._runs)

    def __contains__(self, fp: int) -> bool:
        needle = np.uint64(fp)
        for run in self._runs:
            i = int(np.searchsorted(run, needle))
            if i < run.size and run[i] == needle:
                return True
        return False

    def first_seen(self, fps: bytes | array[int] | np.ndarray) -> np.ndarray:
        """Bool mask, True where the fingerprint is new: not seen in earlier calls nor earlier in fps. Records them.
        fps: a numpy array, or a buffer of 8-byte integers in the machine's order (an array("q"), or the bytes of
        contacts.email_fps), read as unsigned."""
        if isinstance(fps, bytes | bytearray | memoryview | array):
            fps = np.frombuffer(fps, dtype=np.uint64)
        fps = np.asarray(fps)
        if fps.dtype != np.uint64:
            fps = fps.astype(np.uint64)
        mask = np.zeros(fps.shape[0], dtype=bool)
        if fps.size == 0:
            return mask
        uniq, first = np.unique(fps, return_index=True)  # sorted; first occurrence of each
        for run in self._runs:
            if uniq.size == 0:
                break
            pos = np.searchsorted(run, uniq)
            np.minimum(pos, run.size - 1, out=pos)
            keep = run[pos] != uniq
            uniq, first = uniq[keep], first[keep]
        mask[first] = True
        if uniq.size:
            self._add(uniq)
        return mask

    def _add(self, run: np.ndarray) -> None:
        runs = self._runs
        runs.append(run)
        self._count += run.size
        while (len(runs) > 1 and runs[-2].size <= MERGE_FACTOR * runs[-1].size
               and runs[-2].size + runs[-1].size <= RUN_CAP):
            small = runs.pop()
            big = runs.pop()
            if big.size < small.size:
                big, small = small, big
            runs.append(np.insert(big, np.searchsorted(big, small), small))  # linear merge of sorted arrays
