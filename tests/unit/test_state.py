import pytest
from edgeterm.workers import state as S


def test_happy_path_is_legal():
    st = S.ACCEPTED
    for nxt in (S.HANDSHAKING, S.CONNECTING, S.PROXYING, S.HALF_CLOSED, S.CLOSING, S.CLOSED):
        st = S.check(st, nxt)
    assert st == S.CLOSED


def test_proxy_header_path_is_legal():
    """accept_proxy listeners: the PROXY header comes before the handshake."""
    st = S.ACCEPTED
    for nxt in (S.PROXY_HEADER, S.HANDSHAKING, S.CONNECTING, S.PROXYING, S.CLOSED):
        st = S.check(st, nxt)
    # an invalid header or its timeout closes at once: there is no TLS to say goodbye with
    assert S.check(S.PROXY_HEADER, S.CLOSED) == S.CLOSED
    assert S.NAMES[S.PROXY_HEADER] == "proxy-header"


@pytest.mark.parametrize(
    ("cur", "new"),
    [
        (S.ACCEPTED, S.PROXYING),
        (S.HANDSHAKING, S.PROXYING),
        (S.HALF_CLOSED, S.PROXYING),
        (S.CLOSED, S.CLOSING),
        (S.CLOSED, S.CLOSED),
        (S.CLOSING, S.PROXYING),
        (S.PROXY_HEADER, S.CONNECTING),
        (S.PROXY_HEADER, S.CLOSING),
        (S.HANDSHAKING, S.PROXY_HEADER),
        (S.CONNECTING, S.PROXY_HEADER),
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
