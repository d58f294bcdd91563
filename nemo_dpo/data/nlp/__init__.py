"""NeMo Aligner's ``nemo_aligner.data.nlp`` at the same paths: dataset builders and loaders for DPO scripts."""
