"""The master gives each block of whole cells one split: shares by the largest remainder, none lost."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from cropchips.plan.grid import Grid
from cropchips.plan.splits import assign_splits, block_cells, split_counts


@pytest.mark.parametrize("n, ratios, expected", [
    (1, (0.8, 0.1, 0.1), (1, 0, 0)),
    (2, (0.8, 0.1, 0.1), (2, 0, 0)),
    (3, (0.8, 0.1, 0.1), (1, 1, 1)),  # three blocks: every split gets one
    (4, (0.8, 0.1, 0.1), (2, 1, 1)),  # 3.2/0.4/0.4 -> 3/1/0 -> test takes one from train
    (10, (0.8, 0.1, 0.1), (8, 1, 1)),
    (20, (0.8, 0.1, 0.1), (16, 2, 2)),
    (7, (0.5, 0.25, 0.25), (3, 2, 2)),  # 3.5/1.75/1.75: the two largest remainders (0.75) go to val and test
    (5, (0.7, 0.3, 0.0), (4, 1, 0)),  # a zero ratio stays empty
])
def test_split_counts_by_largest_remainder(n, ratios, expected):
    assert split_counts(n, ratios) == expected
    assert sum(expected) == n


def test_block_size_is_rounded_to_whole_cells():
    assert block_cells(10_000, 0.05) == 2  # 0.05 deg ~ 5.6 km north-south
    assert block_cells(10_000, 0.01) == 9
    assert block_cells(1_000, 0.05) == 1  # never less than one cell


def test_every_cell_of_a_block_shares_its_split_and_shares_follow_the_ratios():
    grid = Grid(start_x=2.0, start_y=45.0, step=0.01, x_cells=60, y_cells=40)
    cells = list(grid.cells())
    splits = assign_splits(cells, grid, 2_226, (0.8, 0.1, 0.1))  # 2 x 2 cells a block
    assert set(splits) == {c.id for c in cells}
    blocks: dict[tuple[int, int], set[str]] = {}
    for cell in cells:
        blocks.setdefault((cell.row // 2, cell.col // 2), set()).add(splits[cell.id])
    assert len(blocks) == 600 and all(len(s) == 1 for s in blocks.values())
    shares = Counter(splits.values())
    assert shares == {"train": 4 * 480, "val": 4 * 60, "test": 4 * 60}
    # Not a stripe: each split is spread over the area (its cells span most rows and columns).
    for split in ("val", "test"):
        rows = {c.row for c in cells if splits[c.id] == split}
        assert max(rows) - min(rows) > 30


def test_the_assignment_is_deterministic_and_depends_on_the_grid():
    grid = Grid(start_x=2.0, start_y=45.0, step=0.01, x_cells=20, y_cells=20)
    first = assign_splits(grid.cells(), grid, 1_000, (0.8, 0.1, 0.1))
    assert assign_splits(list(grid.cells())[::-1], grid, 1_000, (0.8, 0.1, 0.1)) == first
    other = replace(grid, start_x=2.005)
    moved = assign_splits(other.cells(), other, 1_000, (0.8, 0.1, 0.1))
    assert Counter(moved.values()) == Counter(first.values())
    assert [moved[c.id] for c in other.cells()] != [first[c.id] for c in grid.cells()]


def test_only_cells_with_tasks_count(sample_plan):
    """The sample plan's tasks carry their cell's split; the plan map shows it."""
    from cropchips.plan.plan_map import plan_map

    splits = {task.cell.id: task.split for task in sample_plan.tasks}
    assert all(s in ("train", "val", "test") for s in splits.values())
    features = {f["properties"]["cell_id"]: f["properties"]["split"] for f in plan_map(sample_plan).to_geojson()["features"]}
    assert {cell: split for cell, split in features.items() if cell in splits} == splits
