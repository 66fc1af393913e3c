"""Publishing a run's model: export to Hugging Face or GGUF (`export`, `gguf_file`), the
provenance record (`provenance`) and the model card rendered from it (`modelcard`), replaying
the run bit for bit (`verify`), evaluation (`evaluate`), distillation (`distill`) and sampling
(`generate`). Imports `run`, `wire` and `errors`."""
