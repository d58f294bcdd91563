"""The installed commands: ``nemo-dpo-train`` (:mod:`.train`) and ``nemo-dpo-plot`` (:mod:`.plot`)."""
