"""Progress on stderr for the long commands: tqdm when it is installed (an
optional dependency), else one plain line, redrawn in place at most twice a
second on a terminal and written every 10 seconds elsewhere (a log)."""

import sys
import time


class Progress:
    def __init__(self, total, desc, leave=True):
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = self.shown = time.perf_counter()
        self.tty = sys.stderr.isatty()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=leave)
        except ImportError:
            self.bar = None

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.shown >= (0.5 if self.tty else 10.0):
            self._show(now)

    def _show(self, now):
        self.shown = now
        line = f"{self.desc}: {self.done}/{self.total}, {now - self.t0:.1f} s"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty and self.shown > self.t0:        # a line was drawn: finish it
            self._show(time.perf_counter())
            print(file=sys.stderr)
