"""Files we read never run code: crafted training states and ``.nemo`` weights are refused, naming the file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from test_hf_checkpoint import write_tokenizer
from test_nemo_archive import VOCAB, nemo_folder, pack
from nemo_dpo.checkpoint.integrity import COMPLETE_MARKER, write_manifest
from nemo_dpo.checkpoint.safe_load import UnsafeFileError
from nemo_dpo.checkpoint.training_checkpoint import checkpoint_problem
from nemo_dpo.checkpoint.training_state import read_training_state, rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_training_state_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "training_state.pt"
    torch.save({"scheduler": CreatesFile(marker), "rng": []}, path)
    with pytest.raises(UnsafeFileError) as raised:
        read_training_state(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "io.open" in message, message
    assert not marker.exists()


def test_resume_refuses_a_crafted_training_state_even_with_a_matching_manifest(tmp_path):
    # Whoever can write the checkpoint can write its manifest too: the checksum is no defence here.
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoints" / "step=1"
    for name in ("weights", "optimizer"):
        (folder / name).mkdir(parents=True)
    (folder / "model_config.yaml").write_text("num_layers: 1\n")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "consumed_samples": 8, "epoch": 0}))
    torch.save({"scheduler": {}, "rng": [CreatesFile(marker)]}, folder / "training_state.pt")
    write_manifest(folder)
    (folder / COMPLETE_MARKER).touch()
    problem = checkpoint_problem(folder)
    assert problem.startswith("training_state.pt cannot be read (UnsafeFileError:"), problem
    assert "io.open" in problem and "\n" not in problem
    assert not marker.exists()


def test_rng_states_round_trip_and_older_files_still_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = rng_state()
    torch.save({"scheduler": {"last_epoch": 3}, "rng": [saved]}, tmp_path / "new.pt")
    want = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(read_training_state(tmp_path / "new.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1)) == want
    # Files written before the format change held python's tuple and numpy's ndarray state.
    random.seed(4), np.random.seed(5)
    torch.save({"scheduler": {}, "rng": [{"python": random.getstate(), "numpy": np.random.get_state(),
                                          "torch": torch.get_rng_state(), "cuda": None}]}, tmp_path / "old.pt")
    want = (random.random(), np.random.rand())
    set_rng_state(read_training_state(tmp_path / "old.pt")["rng"][0])
    assert (random.random(), np.random.rand()) == want


@pytest.fixture
def hostile_nemo(tmp_path):
    """A ``.nemo`` whose ``model_weights.ckpt`` creates ``ran`` when unpickled in full, and a tokenizer."""
    folder = nemo_folder(tmp_path, "hostile")
    marker = tmp_path / "ran"
    torch.save({"model.output_layer.weight": torch.ones(2, 2), "extra": CreatesFile(marker)},
               folder / "model_weights.ckpt")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    write_tokenizer(tokenizer, VOCAB)
    return pack(folder, tmp_path / "hostile.nemo"), tokenizer, marker


def test_crafted_nemo_weights_are_refused_naming_the_file_and_type(hostile_nemo, tmp_path):
    from nemo_dpo.interop import open_pretrained

    archive, tokenizer, marker = hostile_nemo
    source = open_pretrained(archive, tokenizer_path=tokenizer, extract_dir=tmp_path / "cache")
    with pytest.raises(UnsafeFileError) as raised:
        source.load_weights([])  # refused before any model chunk is touched
    message = str(raised.value)
    assert "\n" not in message and "model_weights.ckpt holds objects of type io.open" in message, message
    assert "pretrained_checkpoint.trust_pickled_objects=true" in message
    assert not marker.exists()


def test_trusting_pickled_objects_is_an_explicit_opt_in(hostile_nemo, tmp_path):
    from nemo_dpo.interop import open_pretrained

    archive, tokenizer, marker = hostile_nemo
    source = open_pretrained(archive, tokenizer_path=tokenizer, extract_dir=tmp_path / "cache",
                             trust_pickled_objects=True)
    # Unpickled in full (the marker proves it); then the weights themselves do not fit.
    with pytest.raises(ValueError, match="tensors the model does not have"):
        source.load_weights([])
    assert marker.exists()
    config = OmegaConf.load(REPO / "conf" / "gpt_dpo.yaml")
    assert config.pretrained_checkpoint.trust_pickled_objects is False


def test_crafted_dist_checkpoint_pickles_are_refused(tmp_path):
    """torch unpickles ``.metadata`` in full and byte items with weights_only=False: both are checked first."""
    import io
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files

    folder = tmp_path / "dist"
    folder.mkdir()
    torch.distributed.checkpoint.save({"w": torch.ones(3), "obj": io.BytesIO(b"fp8")},
                                      storage_writer=torch.distributed.checkpoint.FileSystemWriter(str(folder)))
    check_dist_checkpoint_files(folder)  # what torch writes passes
    metadata = FileSystemReader(str(folder)).read_metadata()
    # An item torch reads with weights_only=False, rewritten in place to run code.
    marker = tmp_path / "ran"
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    payload = io.BytesIO()
    torch.save(CreatesFile(marker), payload)
    shard = folder / info.relative_path
    data = shard.read_bytes()
    shard.write_bytes(data[:info.offset] + payload.getvalue() + data[info.offset + info.length:])
    info.length = len(payload.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError) as raised:
        check_dist_checkpoint_files(folder)
    assert str(raised.value).startswith(f"{shard} (item obj) holds objects of type io.open"), raised.value
    # The metadata itself, replaced by a pickle that runs code.
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    with pytest.raises(UnsafeFileError) as raised:
        check_dist_checkpoint_files(folder)
    assert str(raised.value).startswith(f"{folder / '.metadata'} holds objects of type io.open"), raised.value
    assert "\n" not in str(raised.value) and not marker.exists()
