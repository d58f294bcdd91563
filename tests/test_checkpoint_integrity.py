"""Manifests: every saved folder lists its files; damage to a model folder is one error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from test_hf_checkpoint import write_tokenizer
from test_layouts import MODELS, VOCAB
from nemo_dpo.checkpoint.integrity import MANIFEST, CheckpointError, folder_problem, write_manifest


def save_model_folder(folder: str, tokenizer: str) -> None:
    from nemo_dpo.checkpoint.pretrained import save_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    cfg = OmegaConf.create(MODELS["gpt2_tied"])
    save_pretrained(build_gpt_model(cfg, VOCAB, seed=7), cfg, tokenizer, folder)


def load_model_folder(folder: str) -> str:
    """The error loading ``folder`` raises (in a worker: loading is collective)."""
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    try:
        source = open_pretrained(folder)
        source.load_weights(build_gpt_model(OmegaConf.create(source.architecture), source.vocab_size))
    except CheckpointError as error:
        return str(error)
    return "loaded"


@pytest.fixture(scope="module")
def model_folder(dist_pool, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    (root / "tokenizer").mkdir()
    write_tokenizer(root / "tokenizer", VOCAB)
    dist_pool.run(1, save_model_folder, str(root / "model"), str(root / "tokenizer"))
    return root / "model"


@pytest.fixture
def copy(model_folder, tmp_path) -> Path:
    return Path(shutil.copytree(model_folder, tmp_path / "model"))


def shard_of(folder: Path) -> Path:
    return max((folder / "weights").glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_manifest_lists_every_file_with_size_and_checksum(model_folder):
    listed = json.loads((model_folder / MANIFEST).read_text())["files"]
    files = sorted(p.relative_to(model_folder).as_posix() for p in model_folder.rglob("*") if p.is_file())
    assert sorted(listed) == [name for name in files if name not in (MANIFEST, ".complete")]
    assert "model_config.yaml" in listed and any(name.startswith("weights/") for name in listed)
    for name, entry in listed.items():
        assert entry["size"] == (model_folder / name).stat().st_size and len(entry["sha256"]) == 64
    assert folder_problem(model_folder, ("weights",)) is None


def test_missing_extra_and_changed_files_are_named(copy):
    (copy / "tokenizer" / "extra.txt").write_text("x")
    assert folder_problem(copy, ()) == f"tokenizer/extra.txt is not in its {MANIFEST}"
    (copy / "tokenizer" / "extra.txt").unlink()
    (copy / "model_config.yaml").rename(copy / "elsewhere.yaml")
    assert folder_problem(copy, ()) == "model_config.yaml is missing"
    (copy / "elsewhere.yaml").rename(copy / "model_config.yaml")
    config = (copy / "model_config.yaml").read_text()
    (copy / "model_config.yaml").write_text(config.replace("num_layers: 4", "num_layers: 5"))
    assert folder_problem(copy, ()) == "model_config.yaml fails its sha256 checksum (its contents changed after the save)"
    (copy / MANIFEST).write_text("{")
    assert folder_problem(copy, ()).startswith(f"{MANIFEST} cannot be read (JSONDecodeError")


def test_damaged_model_folder_is_one_error_naming_the_file(dist_pool, copy):
    shard = shard_of(copy)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = dist_pool.run(1, load_model_folder, str(copy))[0]
    assert message == (f"cannot read checkpoint {copy}: weights/{shard.name} fails its sha256 checksum "
                       "(its contents changed after the save)")


def test_unreadable_folder_without_manifest_is_one_error_naming_the_checkpoint(dist_pool, copy):
    (copy / MANIFEST).unlink()
    shard = shard_of(copy)
    shard.write_bytes(b"\0" * 64 + shard.read_bytes()[64:])  # its headers gone, its size the same
    message = dist_pool.run(1, load_model_folder, str(copy))[0]
    assert message.startswith(f"cannot read checkpoint {copy}: weights/") and "\n" not in message, message
    (copy / "weights" / ".metadata").write_bytes(b"")  # as an older save cut short could leave it
    message = dist_pool.run(1, load_model_folder, str(copy))[0]
    assert message == (f"cannot read checkpoint {copy}: weights/ cannot be read (ValueError: "
                       f"{copy / 'weights' / '.metadata'} cannot be read (EOFError: Ran out of input))"), message


def test_manifest_of_a_folder_holds_sizes_and_sha256(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path)
    (tmp_path / ".complete").touch()
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == {
        "sub/a.bin": {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}
    assert folder_problem(tmp_path, ()) is None
