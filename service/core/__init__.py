"""The service's core: sessions, scheduler, engine worker, store and stats. No HTTP in here.

The HTTP layer (service/http) turns requests into the dataclasses of `service.core.types`, calls
`SessionService`, and maps the exceptions of `service.core.errors` to status codes in one table.
"""
