"""``diffscrub`` run under a launcher that reports, at every checkpoint, how many of the student's whole
(pre-shard) parameters are still alive: under --fsdp none may be, or each rank keeps the full model beside
its shard. Prints ``whole parameters alive: A of N`` to stderr; used by test_distributed.py."""

import gc
import sys
import weakref

from diffscrub.cli import main
from diffscrub.core import distributed

_whole: list[weakref.ref] = []
_wrap, _trainable_tensors = distributed.Distributed.wrap, distributed.Distributed.trainable_tensors


def wrap(self, model):
    _whole.extend(weakref.ref(p) for p in model.parameters())
    return _wrap(self, model)


def trainable_tensors(self, model):
    gc.collect()
    alive = sum(ref() is not None for ref in _whole)
    print(f"whole parameters alive: {alive} of {len(_whole)}", file=sys.stderr, flush=True)
    return _trainable_tensors(self, model)


distributed.Distributed.wrap = wrap
distributed.Distributed.trainable_tensors = trainable_tensors

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
