"""What happens to a bad image file (files.py says which are bad): replaced, recorded, named once, counted per pass.

- a bad image is replaced by the next index (wrapping) whose image loads, under the sample's own seed, so that a
  resumed run loads exactly what the interrupted one did; its label comes with it.
- each bad file is logged once, with its path and reason, by the main process; the number met in each pass over the
  data is counted, and more than `max_bad_images` (a share of the pass's images) stops the run with one line
  (workers.CheckedLoader).
Workers are separate processes: they record what they meet in shared memory (`BadImages`), and the main process reads
it every few batches and at the end of each pass.
"""
import logging
from typing import Callable, NamedTuple, Sequence

import torch

from .files import REASONS, BadImage

_logger = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 32  # a sample gives up after this many consecutive bad files: the data set is broken


class TooManyBadImages(Exception):
    """MAX_BAD_IN_A_ROW consecutive files were bad (raised in a worker, turned into a UserError by CheckedLoader)."""


class BadImageReport(NamedTuple):
    count: int  # bad files met since the previous report (each counted once)
    files: tuple  # (path, reason) of the files first found bad since the previous report


class BadImages:
    """The bad files of a dataset, in shared memory: written by whichever process (loader worker or main) meets one,
    read by the main process to name each once and count them per pass.

    Created with the dataset, so before any worker forks; with num_workers 0 the main process writes it itself.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = paths
        self.reason = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()
        self.met_in_pass = torch.zeros(len(paths), dtype=torch.int32).share_memory_()
        self.current_pass = torch.ones(1, dtype=torch.int32).share_memory_()  # loads outside a loader count too
        self.news = torch.zeros(1, dtype=torch.int32).share_memory_()  # set by met(), cleared by the main process
        # main process only
        self._named = set()
        self._named_since_report = []
        self._report_from_pass = 1

    # written where a sample is loaded
    def known(self, index: int) -> bool:
        return bool(self.reason[index])

    def met(self, index: int, reason: int = 0):
        """Record that this pass met bad file `index` (for the first time when `reason` is given)."""
        if reason:
            self.reason[index] = reason
        self.met_in_pass[index] = self.current_pass[0]
        self.news[0] = 1

    # the main process
    def take_news(self) -> bool:
        """Whether a bad file was met since the last call: a read of one shared number, cheap after every batch."""
        news = bool(self.news[0])
        if news:
            self.news[0] = 0
        return news

    def start_pass(self):
        self.current_pass += 1

    def count_in_pass(self) -> int:
        return int((self.met_in_pass == self.current_pass).sum())

    def name_new(self) -> list:
        """Log each bad file not logged before, once, and return their (path, reason)."""
        new = [i for i in self.reason.nonzero().flatten().tolist() if i not in self._named]
        files = [(self.paths[i], REASONS[int(self.reason[i])]) for i in new]
        for path, reason in files:
            _logger.warning(f'Bad image {path}: {reason}; replaced by the next readable image')
        self._named.update(new)
        self._named_since_report += files
        return files

    def epoch_report(self) -> BadImageReport:
        """What was met since the previous report (the files are logged by then)."""
        self.name_new()
        current = int(self.current_pass)
        count = int(((self.met_in_pass >= self._report_from_pass) & (self.met_in_pass <= current)).sum())
        report = BadImageReport(count, tuple(self._named_since_report))
        self._named_since_report, self._report_from_pass = [], current + 1
        return report


def first_readable(index: int, num_samples: int, bad_images: BadImages, load: Callable[[int], object]):
    """load(index), or load() of the next index (wrapping) whose file is not bad; each bad file met is recorded."""
    for step in range(MAX_BAD_IN_A_ROW):
        candidate = (index + step) % num_samples
        if bad_images.known(candidate):
            bad_images.met(candidate)
            continue
        try:
            return load(candidate)
        except BadImage as e:
            bad_images.met(candidate, e.reason)
    raise TooManyBadImages(f'{MAX_BAD_IN_A_ROW} consecutive bad images from index {index}')
