"""The offline end-to-end demo (`vlm demo`): a synthetic cohort through every stage of the pipeline."""
