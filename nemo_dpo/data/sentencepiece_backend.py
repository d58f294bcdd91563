"""SentencePiece ``tokenizer.model`` files behind the ``tokenizers.Tokenizer`` interface.

NeMo 1.0 ``.nemo`` archives and older Llama 2 folders ship only a SentencePiece
model; wrapping it lets :class:`~nemo_dpo.data.tokenizer.HFTokenizer` serve it
unchanged, chat templates in ``tokenizer_config.json`` included.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any


class SentencePieceBackend:
    """The part of ``tokenizers.Tokenizer``'s interface that HFTokenizer uses, over SentencePiece."""

    def __init__(self, model_file: Path):
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError(
                f"{model_file} is a SentencePiece model: `pip install sentencepiece` to read it"
            ) from err
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        # tokenizers keeps the unknown token on its model; HFTokenizer reads it from there.
        unk_id = self.processor.unk_id()
        self.model = SimpleNamespace(unk_token=self.processor.id_to_piece(unk_id) if unk_id >= 0 else None)

    def no_truncation(self) -> None:
        pass

    def no_padding(self) -> None:
        pass

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        # SentencePiece adds no BOS/EOS by itself, which is what text_to_ids wants.
        return SimpleNamespace(ids=self.processor.encode(text))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list:
        return [SimpleNamespace(ids=ids) for ids in self.processor.encode(list(texts))]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.processor.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.processor.get_piece_size()

    def special_tokens(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/``pad_token`` the model defines (ids < 0 mean none)."""
        ids = {"bos_token": self.processor.bos_id(), "eos_token": self.processor.eos_id(),
               "pad_token": self.processor.pad_id()}
        return {key: self.processor.id_to_piece(token_id) for key, token_id in ids.items() if token_id >= 0}
