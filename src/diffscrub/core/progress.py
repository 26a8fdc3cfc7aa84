"""Progress bars for the run's phases."""

from __future__ import annotations


class Progress:
    """A tqdm bar, or nothing when quiet."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img" if "phase 1" in desc else "step", leave=True)

    def __call__(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
