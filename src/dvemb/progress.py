"""Progress bars for long work, without tqdm's monitor thread.

tqdm's background monitor thread was measured to slow small torch matmuls on a
2-core machine by ~25x while it lives, so our bars never start it.
"""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar(tqdm):
    """A tqdm bar that never starts the monitor thread."""

    monitor_interval = 0
