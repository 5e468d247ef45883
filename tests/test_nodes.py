"""A node that holds none of the driver's files: what a tokenize actor receives and checks.

The actor is built in this process, as Ray would build it on a node, from what the driver
sends (``actor_arguments``); a node missing a file the config names, the driver's data folder,
or the driver's tokenizers refuses in one line and writes nothing.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import tiny_config_dict
from mot_core.distributed.tokenize import _TokenizeParts, actor_arguments
from mot_core.experiment.build import build_experiment
from mot_core.experiment.nodes import check_named_paths, named_paths, remove_marker
from mot_core.experiment.resolve import resolve_config
from mot_core.experiment.tokenize import fingerprints, prepare_vocabulary
from mot_core.errors import MotError


@pytest.fixture
def driver(tmp_path, text_corpus):
    """The driver's side: a fitted tokenizer in its run folder, and the actors' arguments."""
    corpus = tmp_path / "corpus"
    shutil.copytree(text_corpus, corpus)
    config = resolve_config(tiny_config_dict(corpus, tmp_path / "run"))
    exp = build_experiment(config)
    vocab = prepare_vocabulary(exp)
    arguments = actor_arguments(config, exp, fingerprints(exp, vocab))
    yield arguments, corpus, tmp_path / "run"
    remove_marker(arguments["marker"])


def _one_part(actor: _TokenizeParts) -> dict:
    return actor({"source": ["text_files"], "split": ["train"], "part": [0]})


def test_an_actor_elsewhere_uses_the_driver_tokenizers_and_writes_the_driver_shards(driver):
    arguments, _, run_dir = driver
    shutil.rmtree(run_dir / "state")  # the node has no copy of the run folder: only what was sent
    actor = _TokenizeParts(**arguments)
    assert actor.error == ""
    assert str(actor.exp.run_dir) != str(run_dir)  # its own folder for the tokenizers it received
    out = _one_part(actor)
    assert out["error"] == [""] and out["shards"][0] != "[]"
    assert (run_dir / "tokens" / "text_files" / "train").is_dir()  # into the driver's data.dir


def test_an_actor_whose_tokenizer_differs_refuses_in_one_line(driver):
    arguments, _, _ = driver
    # as a node whose tokenizer is another one (fitted there on other data, an older copy)
    arguments["state"] = {"text": {name: data + b" " if name.endswith(".json") else data
                                   for name, data in arguments["state"]["text"].items()}}
    actor = _TokenizeParts(**arguments)
    assert actor.error.startswith("node ") and "builds another modality 'text's tokenizer than the driver" in actor.error
    assert _one_part(actor)["error"] == [actor.error] and "\n" not in actor.error


def test_an_actor_that_cannot_see_a_path_the_config_names_says_which(driver):
    arguments, corpus, _ = driver
    assert ("mixture.datasets.text_files.options.paths[0]", str(corpus / "*.txt")) in arguments["paths"]
    shutil.rmtree(corpus)
    actor = _TokenizeParts(**arguments)
    assert f"cannot see {corpus}/*.txt (mixture.datasets.text_files.options.paths[0])" in actor.error


def test_an_actor_that_does_not_see_the_driver_data_dir_refuses(driver):
    arguments, _, run_dir = driver
    remove_marker(arguments["marker"])  # another folder of the same name on that node
    actor = _TokenizeParts(**arguments)
    assert f"does not see the driver's data.dir {run_dir}/tokens" in actor.error


def test_named_paths_lists_files_and_patterns_not_uris(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    config = {"mixture": {"x": {"paths": [str(tmp_path / "*.txt"), "s3://b/k", str(tmp_path / "none.txt")]}},
              "model": {"init_from": {"path": str(tmp_path)}}, "run": {"dir": str(tmp_path)}}
    assert named_paths(config) == [("mixture.x.paths[0]", str(tmp_path / "*.txt")), ("model.init_from.path", str(tmp_path))]
    with pytest.raises(MotError, match=r"cannot see .*/gone \(model.init_from.path\)"):
        check_named_paths([("model.init_from.path", str(tmp_path / "gone"))])
