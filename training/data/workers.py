"""The DataLoader both input paths run: persistent workers that leave the trainer's signals to the trainer, and the
bad-image checks of the main process around it (bad_images.py)."""
import atexit
import multiprocessing
import signal
import weakref
from typing import Callable, Optional

import torch
import torch.utils.data

from ..config import UserError
from . import bad_images as policy
from .bad_images import BadImageReport, BadImages, TooManyBadImages

def _kill_workers_left():
    """At exit, SIGKILL the DataLoader workers still alive: they ignore SIGTERM (see worker_init), and Python's exit,
    which stops daemonic processes with SIGTERM and waits for them, would wait forever on one whose loader never
    reached close(), such as an iterator whose construction raised. Registered after multiprocessing's own exit hook,
    so it runs first. torch's SIGCHLD handler, which would report each kill as a failed worker, goes first."""
    left = [child for child in multiprocessing.active_children() if child.daemon]
    if left:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in left:
        child.kill()


atexit.register(_kill_workers_left)


def worker_init(worker_id: int):
    # A Ctrl-C or a SIGTERM sent to the process group must reach only the trainer, which saves and then stops the
    # workers; a worker killed by it would break the batch being saved for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_loader(dataset, batch_sampler, workers: int, collate_fn: Callable,
                  pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over our batch sampler whose workers persist between passes (CheckedLoader.close() ends them)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
                                       pin_memory=pin_memory, worker_init_fn=worker_init,
                                       persistent_workers=workers > 0)


class CheckedLoader:
    """A DataLoader's batches, as `batches` (timm's PrefetchLoader, or the GPU path's decoder) delivers them, with
    the bad-image check and the end of the workers.

    After each batch during which a bad file was met, and at the end of each pass, bad files met so far are logged and
    counted; more than `max_bad` in one pass raises UserError at once, not after the pass has trained. Workers persist
    across passes: close() ends them (also called at exit).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, batches, bad_images: Optional[BadImages],
                 max_bad: Optional[float]):
        self.loader = loader
        self.batches = batches
        self.bad_images = bad_images
        self.max_bad = max_bad
        atexit.register(_close_if_alive, weakref.ref(self))

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __iter__(self):
        if self.bad_images is None:
            yield from self.batches
            return
        self.bad_images.start_pass()
        try:
            for batch in self.batches:
                yield batch
                if self.bad_images.take_news():
                    self.check()
        except TooManyBadImages:
            self.bad_images.name_new()
            raise UserError(f'{policy.MAX_BAD_IN_A_ROW} images in a row are unreadable (logged above): the data set '
                            'looks damaged') from None
        self.check()

    def check(self):
        """Log bad files not logged yet; UserError if this pass met more than max_bad."""
        self.bad_images.name_new()
        count = self.bad_images.count_in_pass()
        if (self.max_bad is not None) and (count > self.max_bad):
            raise UserError(f'{count} unreadable image(s) in this pass over the data (logged above), more than '
                            f'max_bad_images allows ({self.max_bad:g}): repair or remove them, or raise '
                            'max_bad_images')

    def epoch_report(self) -> BadImageReport:
        """Bad files met since the previous report; (0, ()) for datasets that do not track them."""
        if self.bad_images is None:
            return BadImageReport(0, ())
        return self.bad_images.epoch_report()

    def close(self):
        """End the worker processes.

        They ignore SIGTERM (see worker_init), and persist between passes, so the interpreter's exit, which
        stops daemon processes with SIGTERM and then waits for them, would wait forever. torch 2.14 keeps the
        persistent workers in the DataLoader's private `_iterator`; its `_shutdown_workers()` is what the iterator's
        own destructor calls.
        """
        iterator = getattr(self.loader, '_iterator', None)
        self.loader._iterator = None
        if iterator is not None:
            iterator._shutdown_workers()

    def __enter__(self) -> 'CheckedLoader':
        return self

    def __exit__(self, *exc):
        self.close()


def _close_if_alive(ref: weakref.ref):
    loader = ref()
    if loader is not None:
        loader.close()
