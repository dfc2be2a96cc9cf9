"""The models: the seed's ``toy``, the Llama-style ``transformer`` (and its Hugging Face mapping,
``hf_llama``), any ``transformers`` causal LM from a local config (``hf``), and the user's own
through ``plugins``. ``build`` makes the one a config names, identically on every rank, and reads
its output as logits; ``sharding`` says where FSDP2 shards it; ``init_weights`` seeds a fresh run
from a saved state dict or a safetensors folder."""
