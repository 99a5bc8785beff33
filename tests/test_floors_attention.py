"""benchmarks/floors_attention.py: its score counts are the attention masks' own, its FLOPs follow the kernels'
products, its goals are the issue's, and its table reads bench_attention.py's JSON."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hmar.attention.triton_kernel import _bounds_lists

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
_spec = importlib.util.spec_from_file_location("floors_attention", _BENCH / "floors_attention.py")
fa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fa)


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("N", [680, 2240, 9451])
def test_scores_are_the_masks_visible_entries(N, pattern):
    lengths = fa.SCHEDULES[N]
    row_lo, row_hi, _, _ = _bounds_lists(lengths, pattern)   # the keys each query sees (the kernels' bounds)
    assert sum(lengths) == N and fa.scores(lengths, pattern) == sum(h - lo for lo, h in zip(row_lo, row_hi))


def test_floors_follow_the_products_and_exponentials():
    E = 4 * 16 * fa.scores(fa.SCHEDULES[9451], "block_diagonal")
    f = fa.floors(9451, 4, 16, "block_diagonal")
    mm = lambda flops: flops / 713e12 * 1e3   # noqa: E731  (ms)
    ex = lambda n: n / (16 * 132 * 1.98e9) * 1e3   # noqa: E731
    assert f["fwd"] == pytest.approx(mm(4 * E * 64)) and f["fwd_serial"] == pytest.approx(mm(4 * E * 64) + ex(E))
    assert f["bwd"] == pytest.approx(mm(14 * E * 64)) and f["bwd_serial"] == pytest.approx(mm(14 * E * 64) + ex(2 * E))
    assert f["bwd_atomic"] == pytest.approx(mm(10 * E * 64))
    # at the smallest shape the bytes bound every part: 4 (8) bf16 [B, H, N, 64] tensors at 4.1 TB/s
    small = fa.floors(680, 4, 16, "block_diagonal")
    assert small["fwd"] == pytest.approx(4 * 4 * 16 * 680 * 64 * 2 / 4.1e9)
    assert small["bwd"] == small["bwd_atomic"] == pytest.approx(2 * small["fwd"])


def test_goals_are_the_issues():
    # 1.2x the per-scale SDPA (the same run's, and the issue's block-diagonal figure), 1.5x the official kernel
    assert fa.goal_ms(9451, 4, 16, "block_diagonal", 7.36) == pytest.approx(3.8 / 1.2)
    assert fa.goal_ms(680, 16, 16, "block_diagonal", 3.08) == pytest.approx(0.73 / 1.5)
    assert fa.goal_ms(9451, 4, 16, "block_causal", 11.892) == pytest.approx(11.892 / 1.2)
    assert fa.goal_ms(9451, 16, 30, "block_causal", None) is None


def test_the_table_of_section_one(capsys):
    assert fa.main([]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("block_")]
    assert len(lines) == 24   # the bf16 half of the 48-row grid
    row = next(ln for ln in lines if ln.split()[:4] == ["block_diagonal", "9451", "4", "16"])
    assert "4.432" in row and "3.167" in row
