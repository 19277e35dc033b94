"""Routes by resource: sessions (+ append), ask, the OpenAI-compatible endpoint, ops (health, ready, metrics)."""
