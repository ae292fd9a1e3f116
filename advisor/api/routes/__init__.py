"""Thin routers over ``advisor.service``: parse (schemas), call the service, return its dict."""
