"""The tiny hybrid model (MoE, MTP, packed documents) trains to the same fp32 losses and grad
norms under TP2+SP, PP2, PP2+VPP2, EP2 and TP2xEP2 on CPU/gloo as in one process.

(The distributed optimizer is Adam-only; its equivalence is tested in tests/parallel.)"""

import pytest

from ring_train.testing.multiprocess import run_ranks
from tests.model.hybrid_layouts import Layout, train

REL_TOL = 1e-6


@pytest.fixture(scope="module")
def single_process_history():
    return run_ranks(train, 1, Layout(), timeout=300)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, world_size",
    [
        (Layout(tp=2), 2),
        (Layout(pp=2), 2),
        (Layout(pp=2, vpp=2), 2),
        (Layout(ep=2), 2),
        (Layout(tp=2, ep=2), 4),
    ],
    ids=["tp2-sp", "pp2", "pp2-vpp2", "ep2", "tp2xep2"],
)
def test_layout_matches_single_process(single_process_history, layout, world_size):
    histories = run_ranks(train, world_size, layout, timeout=600)
    expected = single_process_history
    assert len(expected) == 3
    for history in histories:  # every rank reports the global loss and grad norm
        for (loss, norm), (ref_loss, ref_norm) in zip(history, expected):
            assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), (history, expected)
            assert abs(norm - ref_norm) <= REL_TOL * abs(ref_norm), (history, expected)
    # The model really trained: losses move, so equal histories are not trivially equal.
    assert expected[0][0] != expected[-1][0]
