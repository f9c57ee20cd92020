"""VisiPruner inside vLLM: a vllm.general_plugins plugin (see README, "Serving with vLLM")."""
