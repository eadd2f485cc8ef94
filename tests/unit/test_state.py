import pytest
from edgeterm.workers import state as S


def test_happy_path_is_legal():
    st = S.ACCEPTED
    for nxt in (S.HANDSHAKING, S.CONNECTING, S.PROXYING, S.HALF_CLOSED, S.CLOSING, S.CLOSED):
        st = S.check(st, nxt)
    assert st == S.CLOSED


@pytest.mark.parametrize(
    ("cur", "new"),
    [
        (S.ACCEPTED, S.PROXYING),
        (S.HANDSHAKING, S.PROXYING),
        (S.HALF_CLOSED, S.PROXYING),
        (S.CLOSED, S.CLOSING),
        (S.CLOSED, S.CLOSED),
        (S.CLOSING, S.PROXYING),
    ],
)
def test_illegal_transitions_raise(cur, new):
    with pytest.raises(S.IllegalTransition) as info:
        S.check(cur, new)
    assert S.NAMES[cur] in str(info.value) and S.NAMES[new] in str(info.value)


def test_every_state_reaches_closed_and_closed_is_terminal():
    for st in range(len(S.NAMES) - 1):
        assert (st, S.CLOSED) in S.TRANSITIONS
    assert not [t for t in S.TRANSITIONS if t[0] == S.CLOSED]
