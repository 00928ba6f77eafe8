"""Row pieces (``qgalore_dist.checkpoint.pieces``): tensors written as N ranks' slices read back as any slice — the
storage under the fsdp engine's resharding checkpoints. Exact by construction (bytes are copied, never computed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgalore_dist.checkpoint.pieces import PieceReader, tensor_starts, write_pieces
from qgalore_dist.checkpoint.save_load import flatten_state
from qgalore_dist.errors import CheckpointError


def _cuts(total: int, n: int, data) -> list[int]:
    inner = sorted(data.draw(st.lists(st.integers(0, total), min_size=n - 1, max_size=n - 1)))
    return [0, *inner, total]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), rows=st.integers(0, 23), cols=st.integers(1, 5), n=st.integers(1, 4),
       axis=st.sampled_from([0, 1]), dtype=st.sampled_from([torch.float64, torch.uint8, torch.float32]))
def test_any_slice_of_pieces_equals_the_slice_of_the_whole(tmp_path_factory, data, rows, cols, n, axis, dtype):
    tmp = tmp_path_factory.mktemp("pieces")
    whole = (torch.arange(rows * cols * 3, dtype=torch.float64).reshape(rows, cols * 3) * 1.37).to(dtype)
    if axis == 1:
        whole = whole.t().contiguous()  # pieces along axis 1
    total = whole.shape[axis]
    cuts = _cuts(total, n, data)
    for r in range(n):
        piece = whole.narrow(axis, cuts[r], cuts[r + 1] - cuts[r])
        state = {"w": piece, "copy": torch.tensor([7.5, float(r)])[:1]}
        tree, tensors = flatten_state(state)
        write_pieces(tmp, "s", r, tree, tensors, tensor_starts(tree, {"w": (cuts[r], axis)}))
    a = data.draw(st.integers(0, total))
    b = data.draw(st.integers(a, total))
    with PieceReader(tmp, "s", n) as reader:
        assert torch.equal(reader.rows("w", a, b - a, axis), whole.narrow(axis, a, b - a))
        assert torch.equal(reader.whole("copy"), torch.tensor([7.5]))
        assert len(reader.trees) == n


def test_a_gap_names_the_tensor_and_the_missing_range(tmp_path):
    whole = torch.arange(12.0).reshape(6, 2)
    for r, (a, b) in enumerate([(0, 2), (4, 6)]):  # rows 2, 3 were never written
        tree, tensors = flatten_state({"w": whole[a:b]})
        write_pieces(tmp_path, "s", r, tree, tensors, {"w": (a, 0)})
    with PieceReader(tmp_path, "s", 2) as reader:
        assert torch.equal(reader.rows("w", 4, 2), whole[4:6])
        with pytest.raises(CheckpointError, match=r"'w' do not cover \[2, 6\)"):
            reader.rows("w", 1, 5)
        with pytest.raises(CheckpointError, match="no rank saved tensor 'v'"):
            reader.rows("v", 0, 1)


def test_a_missing_or_foreign_rank_file_is_a_checkpoint_error(tmp_path):
    tree, tensors = flatten_state({"w": torch.zeros(2)})
    write_pieces(tmp_path, "s", 0, tree, tensors, {"w": None})
    with pytest.raises(CheckpointError, match="s_rank00001.json"):
        PieceReader(tmp_path, "s", 2)
    (tmp_path / "s_rank00001.json").write_text('{"format": "qgalore_dist.pieces/1", "rank": 0, "tree": {}, '
                                               '"pieces": {}}')
    with pytest.raises(CheckpointError, match="holds rank 0's pieces, not rank 1's"):
        PieceReader(tmp_path, "s", 2)
