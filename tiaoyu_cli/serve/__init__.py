"""`tiaoyu serve`: an OpenAI-compatible API and a chat page over one checkpoint (server.py, static/index.html)."""
