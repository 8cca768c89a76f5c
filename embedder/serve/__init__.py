"""The HTTP search service and its web page."""
