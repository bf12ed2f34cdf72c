"""A resume at another global batch keeps the data position exact (issue 40 item 4).

The loader is saved mid-epoch at one global batch and resumed at another (and once more at a third):
over the epoch, every bucket's samples are taken in stream order, none twice, none skipped -- the
samples consumed before the change are exactly the first ones of each bucket, and the batches after it
are the rest of each bucket, cut at the new size.  Single-bucket (stage 1) and multi-bucket (stage 3).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tristage.data.features import FeatureLoader

from .test_cache_features import encoders, spec, stage1, stage3  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def stream(cache_dir: Path) -> dict[tuple, list[str]]:
    """Each bucket's keys in the order epoch 0's shuffled stream yields them."""
    order: dict[tuple, list[str]] = defaultdict(list)
    for sample in FeatureLoader(cache_dir, spec())._shuffled(0):
        order[tuple(sample["meta"]["bucket"])].append(sample["meta"]["key"])
    return order


def epoch0(loader: FeatureLoader, batches: int | None) -> list[list[str]]:
    """The keys of the next ``batches`` global batches of epoch 0 (None: to the end of epoch 0)."""
    out, it = [], iter(loader)
    try:
        while batches is None or len(out) < batches:
            batch = next(it)
            if batch["position"][0] != 0:
                break
            out.append(batch["keys"])
    finally:
        it.close()
    return out


def resumed(cache_dir: Path, state: dict, global_batch: int) -> FeatureLoader:
    loader = FeatureLoader(cache_dir, spec(global_batch=global_batch, cond_dropout=0.0))
    loader.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
    return loader


@pytest.mark.parametrize(
    ("stage", "sizes", "first"),
    [("stage1", (8, 4), 1), ("stage3", (4, 2, 6), 2), ("stage3", (2, 4), 3)],
)
def test_each_bucket_is_taken_in_order_none_twice_none_skipped(stage, sizes, first, request):
    cache_dir = Path(request.getfixturevalue(stage)[0].data.cache_dir)
    order = stream(cache_dir)
    bucket_of = {key: bucket for bucket, keys in order.items() for key in keys}
    loader = FeatureLoader(cache_dir, spec(global_batch=sizes[0], cond_dropout=0.0))
    batches = epoch0(loader, first)
    for size in sizes[1:]:
        state = loader.state_dict()
        loader = resumed(cache_dir, state, size)
        batches += epoch0(loader, first if size != sizes[-1] else None)
    taken: dict[tuple, list[str]] = defaultdict(list)
    for keys in batches:
        (bucket,) = {bucket_of[k] for k in keys}  # one bucket per batch
        taken[bucket] += keys
    for bucket, keys in taken.items():
        assert keys == order[bucket][: len(keys)], bucket  # in stream order: none twice, none skipped
        assert len(order[bucket]) - len(keys) < sizes[-1]  # only a last partial batch is left over
    assert set(taken) == {b for b, keys in order.items() if len(keys) >= sizes[-1]}


def test_the_same_global_batch_resumes_as_before(request):
    """No change of global batch: the saved (epoch, next_index) are used as they are, nothing skipped."""
    cache_dir = Path(request.getfixturevalue("stage1")[0].data.cache_dir)
    loader = FeatureLoader(cache_dir, spec(global_batch=4))
    epoch0(loader, 2)
    state = loader.state_dict()
    assert state["skip"] == {} and state["global_batch"] == 4
    again = resumed(cache_dir, state, 4)
    assert (again.epoch, again.next_index, again.skip) == (0, 2, {})
