"""Training, split by concern: `config` (TrainConfig), `data` and `inputs` (pairs, splits, slide and report
inputs), `schedule` (AdamW groups, learning rate), `checkpoint` (run-folder state), `distributed` (torchrun),
`gradcache`, and `loop` (`train`)."""
