from supervisor.trend import QueueTrend


def test_one_point_per_step_keeping_the_spike_and_fifteen_minutes_at_most():
    tr = QueueTrend(window=900, step=10)
    tr.record(1000.0, {"q": 5, "r": None})
    tr.record(1003.0, {"q": 40})  # within the step: the larger length stands for it
    tr.record(1006.0, {"q": 7})
    tr.record(1012.0, {"q": 8})
    assert tr.points("q") == [[1000.0, 40], [1012.0, 8]]
    assert tr.points("r") == []  # never read: nothing recorded
    for i in range(1, 200):
        tr.record(1012.0 + 10 * i, {"q": i})
    pts = tr.points("q")
    assert pts[-1] == [1012.0 + 1990, 199]
    assert pts[0][0] >= pts[-1][0] - 900 and len(pts) <= 91


def test_a_queue_no_longer_reported_is_forgotten_after_the_window():
    tr = QueueTrend(window=60, step=5)
    tr.record(0.0, {"old": 3, "new": 1})
    tr.record(30.0, {"new": 2})
    assert tr.points("old") == [[0.0, 3]]
    tr.record(61.0, {"new": 2})
    assert tr.points("old") == [] and tr.points("new") == [[30.0, 2], [61.0, 2]]
