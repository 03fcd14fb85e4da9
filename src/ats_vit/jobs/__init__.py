"""The command-line jobs: one module per command (``demo``, ``train``, ``finetune``, ``eval``,
``ablate``, ``viz``, ``bench``), the evaluation and training engines they share, data and model
loading, processes under torchrun, timing and reports."""
