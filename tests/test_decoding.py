"""The CPU image path: task indexes parsed once per process, and Pillow's JPEG draft mode for large images."""

from __future__ import annotations

from components import shards
from components.shards import read_index, write_index


def _rows(n: int, shard: str = "shard-00000.tar") -> list[dict]:
    return [
        {"path": f"img/{i}.jpg", "label": "cat", "split": "train", "sha256": f"{i:064x}", "shard": shard}
        | {"offset": 512 * i, "size": 100 + i, "format": "JPEG", "width": 8, "height": 8}
        for i in range(n)
    ]


def test_an_index_is_parsed_once_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "index.csv"
    write_index(path, _rows(3))
    first, second = read_index(path), read_index(tmp_path / "." / "index.csv")
    assert first == second and first is not second  # each caller gets its own list...
    assert all(a is b for a, b in zip(first, second))  # ...of the rows parsed once
    assert first[1]["offset"] == 512 and first[1]["size"] == 101 and first[1]["domain"] is None

    write_index(path, _rows(4, shard="shard-00001.tar"))  # replaced, as ingestion writes it: parsed afresh
    again = read_index(path)
    assert len(again) == 4 and again[0]["shard"] == "shard-00001.tar"


def test_the_index_cache_keeps_a_bounded_number_of_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "INDEX_CACHE_ROWS", 5)
    monkeypatch.setattr(shards, "_INDEX_CACHE", type(shards._INDEX_CACHE)())
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"t{i}" / "index.csv")
        paths[-1].parent.mkdir()
        write_index(paths[-1], _rows(3))
        read_index(paths[-1])
    assert list(shards._INDEX_CACHE) == [str(paths[2].resolve())]  # the least recently read went first
