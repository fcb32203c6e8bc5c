"""Splits assigned by the master: blocks of whole cells go to train, val or test.

Chips stay inside their cells (:mod:`cropchips.raster.chips`), so chips of cells in different
splits never share a pixel, and the index never has to drop a chip for leaking between splits.

A block is ``n`` x ``n`` cells of the grid, ``n`` = the spec's ``split_block_size`` in metres
rounded to whole cells (at least 1). The blocks that hold a task are ordered by a hash of the
grid and their position (deterministic: the same grid gives the same order), and the splits get
their shares of them by the largest remainder: with ratios 0.8/0.1/0.1 and 20 blocks, 16/2/2.
Once there are three or more blocks, every split with a non-zero ratio gets at least one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from cropchips.plan.grid import Grid
from cropchips.queue.messages import SPLITS, Cell

#: Metres in a degree of latitude (the cell's north-south side), for rounding the block size to cells.
METRES_PER_DEGREE = 111_320.0


def block_cells(split_block_size_m: float, grid_step_deg: float) -> int:
    """Cells per block side: the block size in metres over the cell's north-south side, rounded, >= 1."""
    return max(1, round(split_block_size_m / (grid_step_deg * METRES_PER_DEGREE)))


def split_counts(n_blocks: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """How many of ``n_blocks`` each split gets: the largest remainder of ``ratios`` x ``n_blocks`` (ties go
    to the earlier split), then, with three or more blocks, one block moved from the largest share to each
    split with a non-zero ratio that got none."""
    exact = [r * n_blocks for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n_blocks - sum(counts)]:
        counts[i] += 1
    if n_blocks >= len(ratios):
        for i, ratio in enumerate(ratios):
            if ratio > 0 and counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return tuple(counts)


def _block_order(grid: Grid, n: int, block: tuple[int, int]) -> str:
    return hashlib.sha256(f"{grid.grid_id}|{n}|{block[0]}|{block[1]}".encode()).hexdigest()


def assign_splits(cells: Iterable[Cell], grid: Grid, split_block_size_m: float,
                  ratios: Sequence[float]) -> dict[str, str]:
    """Cell id -> split for ``cells`` (the cells that get a task), every cell of a block in the same split."""
    cells = list(cells)
    n = block_cells(split_block_size_m, grid.step)
    block_of = {cell.id: (cell.row // n, cell.col // n) for cell in cells}
    blocks = sorted(set(block_of.values()), key=lambda b: _block_order(grid, n, b))
    split_of_block: dict[tuple[int, int], str] = {}
    start = 0
    for split, count in zip(SPLITS, split_counts(len(blocks), ratios)):
        for b in blocks[start:start + count]:
            split_of_block[b] = split
        start += count
    return {cell_id: split_of_block[b] for cell_id, b in block_of.items()}

