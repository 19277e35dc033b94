"""The HTTP layer: thin FastAPI routes over service.core (`create_app(settings)` in service/http/app.py)."""
