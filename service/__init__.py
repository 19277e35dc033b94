"""The ARMT memory service: `core` (sessions, stores, the engine worker; no HTTP), `http` (the FastAPI app), the
`armt` command line (cli*.py) and the Python client (client.py)."""
