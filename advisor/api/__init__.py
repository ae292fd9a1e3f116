"""The HTTP service. ``create_app(settings)`` builds it; importing this package builds nothing.

``advisor.api.schemas`` imports pydantic only (the client reuses it); FastAPI is imported by the
app, routes and middleware modules.
"""
