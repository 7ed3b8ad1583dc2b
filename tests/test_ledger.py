"""The byte ledger: totals are the sum of the round entries, failures keep what went down and why."""

from deepfusion.ledger import NETWORK, Ledger


def test_totals_are_the_entries_summed_and_a_failure_keeps_its_reason():
    ledger = Ledger(["a", "b"])
    ledger.record("a", 1, down=10, up=100)
    ledger.record("b", 1, failed="TimeoutError: late", down=10)
    ledger.record("a", 2, down=10, up=90)
    ledger.note("a", sha256="x")
    assert ledger.totals() == {"up": 190, "down": 30, "per_device": ledger.per_device}
    assert ledger.up_in_round(1) == 100 and ledger.up_in_round(2) == 90
    assert ledger.last("b") == {"round": 1, "up": 0, "down": 10, "failed": "TimeoutError: late"}
    assert ledger.of_round(2) == {"a": [{"round": 2, "up": 90, "down": 10, "sha256": "x"}], "b": []}


def test_a_replayed_entry_and_a_restored_ledger_count_alike():
    live = Ledger(["a"])
    live.record("a", 1, down=5, up=7)
    replayed = Ledger(["a"])
    for entry in live.of_round(1)["a"]:
        replayed.add("a", entry)
    assert replayed.totals() == live.totals()
    assert Ledger.restore(live.per_device).totals() == live.totals()


def test_network_counts_keep_the_setup_apart_inside_the_totals():
    ledger = Ledger(["a"], NETWORK, setup=True)
    ledger.count_setup("a", down=50, up=0, down_message=80, up_message=20)
    ledger.record("a", 1, down=10, up=100, down_message=40, up_message=130)
    totals = ledger.totals()
    assert (totals["down"], totals["down_message"], totals["up_message"]) == (60, 120, 150)
    assert ledger.per_device["a"]["setup"] == {"up": 0, "down": 50, "up_message": 20, "down_message": 80}
