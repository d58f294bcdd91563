"""Other checkpoint formats in and out: Hugging Face (a family table) and NeMo 1.0 ``.nemo``.

:func:`open_pretrained` opens any supported checkpoint (our own model folders
too) as a :class:`PretrainedSource`; :func:`nemo_dpo.interop.hf.export_hf`
writes a model as a Hugging Face folder.
"""

from nemo_dpo.interop.restore import READERS, open_pretrained
from nemo_dpo.interop.source import PretrainedReader, PretrainedSource

__all__ = ["READERS", "PretrainedReader", "PretrainedSource", "open_pretrained"]
