import socket

from edgeterm.workers.loop import Loop


class _Obj:
    def __init__(self):
        self.timer_entry = None
        self.fired = []

    def on_timer(self, now):
        self.fired.append(now)


def test_timer_fires_once_at_its_time_and_earlier_rearm_wins():
    loop = Loop()
    obj = _Obj()
    loop.arm(obj, loop.now + 10.0)
    loop.arm(obj, loop.now + 0.01)  # earlier: replaces
    loop.arm(obj, loop.now + 5.0)  # later: ignored, the earlier entry stays
    for _ in range(100):
        loop.run_once(max_wait=0.05)
        if obj.fired:
            break
    assert len(obj.fired) == 1
    loop.run_once(max_wait=0.0)
    assert len(obj.fired) == 1


def test_disarmed_timer_never_fires_and_heap_compacts():
    loop = Loop()
    objs = [_Obj() for _ in range(10000)]
    for o in objs:
        loop.arm(o, loop.now + 0.0)
    for o in objs:
        loop.disarm(o)
    assert len(loop._heap) < 10000  # compacted once the dead dominated
    loop.run_once(max_wait=0.0)
    assert not any(o.fired for o in objs)


def test_fd_events_dispatch_and_stale_handler_gets_the_event():
    loop = Loop()
    a, b = socket.socketpair()
    seen = []
    loop.add(a.fileno(), 0x001, lambda ev: seen.append(("a", ev)))
    b.send(b"x")
    loop.run_once(max_wait=1.0)
    assert seen and seen[0][0] == "a"
    loop.remove(a.fileno())
    b.send(b"y")
    loop.run_once(max_wait=0.05)
    assert len(seen) == 1
    a.close()
    b.close()


def test_call_soon_runs_without_waiting():
    loop = Loop()
    ran = []
    loop.call_soon(lambda: ran.append(1))
    loop.run_once(max_wait=5.0)
    assert ran == [1]
