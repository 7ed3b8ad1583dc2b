"""The command line's log: our lines on stderr, one line per record, third-party noise a user cannot act on off.

stdout carries results only (cli.py); every `deepfusion` command calls setup_logging once before its work.
"""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(verbose: bool) -> None:
    """Our log lines on stderr (stdout carries results only), one line per record however long (grep and
    log files read them whole); third-party noise a user cannot act on off."""
    handler = StderrHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)-7s %(message)s",
                                          "%H:%M:%S" if sys.stderr.isatty() else "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("transformers", "urllib3", "filelock", "matplotlib"):  # matplotlib: "generated new fontManager"
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Silenced, each a notice about the libraries' own future, not about anything the user passed:
    #   Flower: "DEPRECATED FEATURE: The `run_simulation` function is deprecated" (our --engine flower uses it
    #     on purpose: `flwr run` cannot take this CLI's --config/--out; engines/flower/simulation.py)
    #   Ray: FutureWarning "Tip: In future versions of Ray, Ray will no longer override accelerator visible
    #     devices env var if num_gpus=0" (we size the simulation's GPUs ourselves)
    #   transformers: the "Loading weights" / "Writing model shards" progress bars of every load and export
    logging.getLogger("flwr").addFilter(_not_run_simulation_deprecation)  # one object: added once, however often
    warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _not_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    return "`run_simulation` function is deprecated" not in record.getMessage()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record: while live progress bars show, rich redirects it
    and prints the record above the bars (a handler holding the original stream would tear them)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ and setStream assign it; the current sys.stderr wins
        pass


class OneLineFormatter(logging.Formatter):
    """A record is one line: the newlines of a multi-line message (an error's text, a pretty dict) become ' | '."""

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line.strip())
