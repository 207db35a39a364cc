"""The content digest's memo (components/model/embedding_cache.py, ``content_digest``): a drop's images are hashed
once per process, remembered for that task object only. Python gives a new object the id of one that is gone,
so a digest remembered for a task no longer alive must not be handed to another task that now has its id: that
would key the new task's embeddings by the old one's images."""

from __future__ import annotations

import weakref

from components.model import embedding_cache
from components.model.data import load_task
from tests.drops import make_task


class _Gone:
    pass


def test_a_digest_remembered_for_a_task_that_is_gone_is_not_given_to_the_next_with_its_id(tmp_path):
    task = load_task(str(make_task(tmp_path, "t-memo", ["cat", "dog"], train=2, test=1)))
    right = embedding_cache.content_digest(task, "train")
    gone = _Gone()
    dead = weakref.ref(gone)
    del gone  # the weak reference is now dead, as for a task collected before this one took its id
    assert dead() is None
    with embedding_cache._LOCK:
        embedding_cache._CONTENT_DIGESTS[(id(task), "train")] = (dead, "0" * 64)
    assert embedding_cache.content_digest(task, "train") == right
