"""The page for people: static files only (HTML, plain JS, CSS, vendored Swagger UI), served by
``advisor.api.routes.web``. A package so that the files ship inside the wheel (pyproject package data)."""
