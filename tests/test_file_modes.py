"""Files we write follow the user's umask (0644 files, 0755 folders under umask 022), not 0600/0700."""

import os
import shutil
import stat
from pathlib import Path

from omegaconf import OmegaConf


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def save_and_export_default_model(private_tokenizer: str, folder: str, out: str) -> dict[str, dict[str, int]]:
    """Under umask 022: stage a private (0700/0600) tokenizer, save a model folder with it, export it to HF."""
    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR, TOKENIZER_DIR, save_pretrained
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    previous = os.umask(0o022)
    try:
        initialize_parallel(ParallelLayout(1, 1))
        shutil.copytree(DEFAULT_MODEL_DIR / TOKENIZER_DIR, private_tokenizer)
        for path in [*Path(private_tokenizer).iterdir(), Path(private_tokenizer)]:
            path.chmod(0o700 if path.is_dir() else 0o600)
        source = open_pretrained(DEFAULT_MODEL_DIR, tokenizer_path=private_tokenizer)
        cfg = OmegaConf.create(source.architecture)
        chunks = build_gpt_model(cfg, source.vocab_size)
        source.load_weights(chunks)
        save_pretrained(chunks, cfg, source.tokenizer_dir, folder)
        export_hf(chunks, source.architecture, source.vocab_size, out, tokenizer_dir=source.tokenizer_dir)
        return {
            "staged": _modes(Path(source.tokenizer_dir)),
            "saved": _modes(Path(folder) / TOKENIZER_DIR),
            "exported": _modes(Path(out)),
        }
    finally:
        os.umask(previous)


def test_written_files_follow_the_umask(dist_pool, tmp_path):
    modes = dist_pool.run(
        1, save_and_export_default_model, str(tmp_path / "private"), str(tmp_path / "model"), str(tmp_path / "hf")
    )[0]
    exported = modes["exported"]
    assert any(name.endswith(".safetensors") for name in exported) and "config.json" in exported
    assert "tokenizer.json" in exported  # the copied tokenizer files are checked too
    for where, found in modes.items():
        assert found["."] == 0o755, (where, oct(found["."]))
        files = {name: oct(mode) for name, mode in found.items() if name != "."}
        assert files and set(files.values()) == {"0o644"}, (where, files)
