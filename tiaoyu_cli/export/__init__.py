"""Export a checkpoint for other tools: a Hugging Face folder (`hf.py`) or a llama.cpp GGUF file (`gguf.py`)."""
