"""A training run and its state: the corpus and tokenizer (`data`), the model (`model`,
`lora`), the inner loop (`train`, `schedule`, `warmstart`), checkpoints, the run folder
(`folder`), the ledger (`ledger`), and one-machine training (`solo`). Imports `wire` and
`errors` only; the coordinator, the volunteer and publishing build on it."""
