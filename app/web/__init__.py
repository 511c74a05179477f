"""The data owner's web page: static files served by :mod:`app.api.routes.web`."""
