"""The command line's log: one line per record, on whatever stderr is now, Flower's run_simulation notice off."""

import logging

from deepfusion.logs import setup_logging


def test_a_record_is_one_line_on_the_current_stderr(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)  # the Flower engine turns it off for its runs
    setup_logging(False)
    logging.getLogger("deepfusion").info("first\nsecond\n\nthird")
    logging.getLogger("flwr").warning("The `run_simulation` function is deprecated")
    logging.getLogger("flwr").warning("a real Flower warning")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].endswith("INFO    first | second | third"), err
    assert err[1].endswith("a real Flower warning")
